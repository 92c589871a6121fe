"""Transient network faults are retried (issue 25 item 1): a loopback server injects 503s, 429s
with Retry-After, bodies cut mid-way, connection resets and stalls; the table equals the clean
run's, a file that changes between attempts stops the read, a server that stays down is one
error line after the attempts."""

from __future__ import annotations

import email.utils
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import dora_analysis as da
from dora_analysis.cli import main
from dora_analysis.errors import CheckpointChangedError, CheckpointNotFoundError, ConfigError
from dora_analysis.io import remote_file
from dora_analysis.io.open import ReadOptions, open_checkpoint
from dora_analysis.io.remote import RemoteSafetensors, Url
from dora_analysis.io.retry import Exhausted, RetryPolicy, ShortBody, is_transient, retry_after
from tests.common import perturb
from tests.io.test_remote import NUMBERS, big_state, root, same  # noqa: F401 - root: fixture
from tests.servers import Fault, FileServer


@pytest.fixture(autouse=True)
def tiny_backoff(monkeypatch):
    """Retries in milliseconds, so fault tests stay fast (the env var a user would set)."""
    monkeypatch.setenv("DORA_ANALYSIS_RETRY_BACKOFF", "0.01")
    monkeypatch.delenv("DORA_ANALYSIS_RETRIES", raising=False)
    monkeypatch.delenv("DORA_ANALYSIS_RETRY_TOTAL", raising=False)


@pytest.fixture(scope="module")
def files(root):  # noqa: F811 - test_remote's checkpoints: base and tuned safetensors among them
    return root


@pytest.fixture(scope="module")
def clean(files):
    return da.analyze(files / "base.safetensors", files / "tuned.safetensors")[NUMBERS]


def test_every_kind_of_transient_fault_is_retried_and_the_table_equals_the_clean_run(files, clean):
    faults = [Fault("status", 503, method="HEAD", ranged=False),  # the size: HEAD, then GET
              Fault("status", 503, ranged=False),
              Fault("status", 503, path="tuned"), Fault("status", 502, path="base"),
              Fault("status", 429, retry_after="1", path="tuned"),
              Fault("cut", fraction=0.5, path="tuned"), Fault("cut", fraction=0.0, path="base"),
              Fault("reset", path="tuned"), Fault("reset", path="base")]
    with FileServer(files, faults=list(faults)) as srv:
        started = time.monotonic()
        table = da.analyze(f"{srv.url}/base.safetensors", f"{srv.url}/tuned.safetensors")
        took = time.monotonic() - started
        assert len(srv.injected) == len(faults) and not srv.faults  # every fault was hit
    same(table[NUMBERS], clean)
    assert took >= 1.0  # Retry-After: 1 was honoured (the backoff alone is milliseconds)


def test_a_stall_past_the_read_timeout_is_retried(files):
    with FileServer(files, faults=[Fault("stall", seconds=2.0, path="tuned")]) as srv:
        with open_checkpoint(Url(f"{srv.url}/tuned.safetensors"), ReadOptions(timeout=0.5)) as src:
            got = {n: src.get_tensor(n) for n in src.keys()}
        assert len(srv.injected) == 1
    with open_checkpoint(files / "tuned.safetensors") as src:
        for name in src.keys():
            assert torch.equal(got[name], src.get_tensor(name))


def test_a_server_that_stays_down_is_one_error_line_after_the_attempts(files, capsys):
    with FileServer(files, status={r"tuned": 503}) as srv:
        url = f"{srv.url}/tuned.safetensors"
        assert main([str(files / "base.safetensors"), url, "--retries", "2"]) == 2
        heads = [r for r in srv.requests if r[0] == "HEAD" and "tuned" in r[1]]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert url in err and "HTTP 503" in err and "3 attempts in" in err
    assert len(heads) == 3  # one first attempt, two retries


def test_the_environment_variable_sets_the_attempts(files, monkeypatch):
    monkeypatch.setenv("DORA_ANALYSIS_RETRIES", "0")
    with FileServer(files, faults=[Fault("status", 503, path="tuned")]) as srv:
        with pytest.raises(CheckpointNotFoundError, match=r"HTTP 503 .*\(1 attempt in"):
            RemoteSafetensors(Url(f"{srv.url}/tuned.safetensors"))  # the header's range


def test_a_file_changed_between_attempts_stops_the_read(files, tmp_path):
    shutil.copy(files / "tuned.safetensors", tmp_path / "m.safetensors")
    other = perturb(big_state(0), 0.05, seed=7)  # same names and shapes: same size

    def rewrite() -> None:
        save_file(other, str(tmp_path / "m.safetensors"))

    with FileServer(tmp_path) as srv:
        src = RemoteSafetensors(Url(f"{srv.url}/m.safetensors"))
        srv.faults.append(Fault("status", 503, before=rewrite))
        with pytest.raises(CheckpointChangedError, match=r"m.safetensors: changed while being "
                                                         r"read"):
            src.get_tensor(src.keys()[0])
        src.close()


def test_a_retry_checks_the_modification_time_when_there_is_no_etag(files):
    from dora_analysis.io.remote_file import identity as f

    assert f({"size": 3, "Last-Modified": "a"}) != f({"size": 3, "Last-Modified": "b"})
    assert f({"size": 3, "ETag": "x"}) != f({"size": 4, "ETag": "x"})


class Status(Exception):
    def __init__(self, status: int, headers: dict | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.headers = status, headers or {}


class Clock:
    """A fake clock advanced by the fake sleep: the policy's timing without waiting."""

    def __init__(self) -> None:
        self.now, self.waits = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def failing(*errors):
    calls = []

    def attempt(n: int):
        calls.append(n)
        if n < len(errors):
            raise errors[n]
        return "ok"

    return attempt, calls


def test_backoff_is_exponential_with_jitter_and_bounded_in_attempts():
    clock = Clock()
    attempt, calls = failing(*[Status(503)] * 10)
    with pytest.raises(Exhausted) as info:
        RetryPolicy(retries=4, backoff=1.0, max_backoff=3.0).call(
            attempt, sleep=clock.sleep, clock=lambda: clock.now)
    assert calls == [0, 1, 2, 3, 4] and info.value.attempts == 5
    assert all(0 <= w <= min(3.0, 2 ** i) for i, w in enumerate(clock.waits))
    assert len(clock.waits) == 4 and len(set(clock.waits)) == 4  # drawn, not fixed


def test_retries_stop_when_the_total_time_is_spent():
    clock = Clock()
    attempt, calls = failing(*[Status(503, {"Retry-After": "20"})] * 10)
    with pytest.raises(Exhausted):
        RetryPolicy(retries=10, total=50.0).call(attempt, sleep=clock.sleep,
                                                 clock=lambda: clock.now)
    assert clock.waits == [20.0, 20.0] and calls == [0, 1, 2]  # a third wait would end past 50 s


def test_retry_after_is_honoured_in_seconds_and_as_a_date():
    clock = Clock()
    attempt, _ = failing(Status(429, {"Retry-After": "7"}))
    assert RetryPolicy(backoff=0.01).call(attempt, sleep=clock.sleep,
                                          clock=lambda: clock.now) == "ok"
    assert clock.waits == [7.0]
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after(Status(503, {"Retry-After": date})) <= 31


@pytest.mark.parametrize("exc, transient", [
    (Status(503), True), (Status(429), True), (Status(500), True), (Status(404), False),
    (Status(403), False), (Status(416), False), (ConnectionResetError(), True),
    (TimeoutError(), True), (ShortBody(1, 2), True), (ConnectionRefusedError(), False),
    (ValueError("bad header"), False)])
def test_what_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_a_fault_that_is_not_transient_is_not_retried():
    attempt, calls = failing(Status(404))
    with pytest.raises(Status):
        RetryPolicy().call(attempt, sleep=lambda s: None)
    assert calls == [0]


def test_bad_retry_settings_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("DORA_ANALYSIS_RETRIES", "many")
    with pytest.raises(ConfigError, match="DORA_ANALYSIS_RETRIES must be a number"):
        RetryPolicy.resolve()
    with pytest.raises(ConfigError, match="--retries must be"):
        da.AnalysisConfig(retries=-1)
    with pytest.raises(SystemExit) as exit_:
        main(["a.safetensors", "b.safetensors", "--retries", "-1"])
    assert exit_.value.code == 2
    assert "--retries" in capsys.readouterr().err


def test_s3_backend_retries_are_ours_alone():
    pytest.importorskip("s3fs")
    fs, _ = remote_file.filesystem(Url("s3://bucket/m.safetensors"))
    assert fs.retries == 1
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 1}


def test_analyze_takes_retries_through_its_settings(files):
    with FileServer(files, faults=[Fault("status", 503, path="tuned")]) as srv:
        with pytest.raises(CheckpointNotFoundError, match=r"HTTP 503 .*\(1 attempt in"):
            da.analyze(files / "base.safetensors", f"{srv.url}/tuned.safetensors", retries=0)


def test_the_policy_refuses_negative_settings():
    with pytest.raises(ConfigError, match="retries must be ≥ 0, got -1"):
        RetryPolicy(retries=-1)
    with pytest.raises(ConfigError, match="total must be ≥ 0"):
        RetryPolicy(total=-5.0)


def test_retry_after_of_a_response_object_and_an_aiohttp_style_reset():
    """huggingface_hub raises HfHubHTTPError with a requests/httpx response (headers an
    object); aiohttp reports a reset as ClientOSError, an OSError carrying ECONNRESET."""
    import errno

    class Response:
        status_code = 429
        headers = {"Retry-After": "7"}

    class HubError(Exception):
        response = Response()

    assert retry_after(HubError()) == 7.0 and is_transient(HubError())

    class ClientOSError(OSError):
        pass

    assert is_transient(ClientOSError(errno.ECONNRESET, "Connection reset by peer"))
    assert not is_transient(ClientOSError(errno.EACCES, "Permission denied"))
