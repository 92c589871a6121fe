"""The dashboard under load: 8 browser sessions at once (tabs of one headless Chromium, each its
own Streamlit session), each analysing different checkpoints — four a run folder typed as a path,
four an adapter they upload. Every session finishes with its own table; no session can read
another's upload, even knowing its reference; the server's peak memory stays bounded. Prints
the time for all 8 and the server's peak RSS (run by CI: make test-slow)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

import dora_analysis as da
from tests.app.test_browser import click, fill, page_text, wait_for
from tests.app.test_server import free_port, start, stop
from tests.common import llama_state, perturb

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("streamlit")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Debian chromium and chromium-driver are needed (installed by .ci/run)",
                allow_module_level=True)
from selenium.webdriver.common.keys import Keys  # noqa: E402

SESSIONS = 8
#: Adapted modules of the uploads: 3 layers each, so 3, 6, 9 and 12 rows.
UPLOAD_TARGETS = (("q_proj",), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj"),
                  ("q_proj", "k_proj", "v_proj", "o_proj"))
SHAPES = {"q_proj": (24, 16), "k_proj": (8, 16), "v_proj": (8, 16), "o_proj": (16, 24)}
#: What the server may add to its memory for 8 sessions at once (measured: see the printout).
PEAK_ABOVE_START = 1 << 30


def adapter(folder: Path, targets: tuple[str, ...], seed: int) -> list[Path]:
    """A PEFT LoRA adapter on ``targets`` of every layer, written as the files a user uploads."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(3):
        for module in targets:
            out, inp = SHAPES[module]
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(2, inp, generator=g) / 4
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, 2, generator=g) / 4
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(save(tensors))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": list(targets)}))
    return [folder / "adapter_config.json", folder / "adapter_model.safetensors"]


def upload_ref(files: list[Path]) -> str:
    """The reference the dashboard gives an upload (``cache.uploaded_adapter``)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return f"upload:{digest.hexdigest()[:16]}"


def memory_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}


def clear(browser, label: str) -> None:
    selector = f"input[aria-label='{label}']"
    # as fill() does: the field can be re-rendered by the rerun the previous input started
    wait_for(browser, f"return document.querySelector({selector!r})")
    field = browser.find_element("css selector", selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)


@pytest.fixture
def data(tmp_path):
    base = llama_state(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    runs = []
    for s in range(SESSIONS - len(UPLOAD_TARGETS)):
        for step in (10, 20, 30):
            folder = tmp_path / f"run{s}" / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            save_file(perturb(base, 0.001 * step * (s + 1), seed=100 * s + step),
                      str(folder / "model.safetensors"))
        runs.append(tmp_path / f"run{s}")
    uploads = [adapter(tmp_path / f"adapter{i}", targets, seed=i)
               for i, targets in enumerate(UPLOAD_TARGETS)]
    return tmp_path / "base.safetensors", runs, uploads


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_eight_sessions_at_once(data, browser, tmp_path):
    base, runs, uploads = data
    port = free_port()
    server, lines = start(port, TMPDIR=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    url = f"http://127.0.0.1:{port}/"
    try:
        tabs = []
        for i in range(SESSIONS):  # every session filled in and started, then all awaited
            if i:
                browser.switch_to.new_window("tab")
            tabs.append(browser.current_window_handle)
            browser.get(url)
            page_text(browser, "Analyse checkpoints")
            if i == 0:
                started_rss = memory_kib(server.pid)["VmRSS"]
            fill(browser, "Base checkpoint", str(base))
            clear(browser, "Module kinds (empty = all)")
            if i < len(runs):
                area = browser.find_elements("css selector", "textarea")
                area[0].send_keys(str(runs[i]))
                area[1].send_keys(f"session-{i}")
            else:
                wait_for(browser, "return document.querySelector(\"input[type='file']\")")
                field = browser.find_elements("css selector", "input[type='file']")[0]
                field.send_keys("\n".join(map(str, uploads[i - len(runs)])))
                page_text(browser, "adapter_config.json")
            if i == 0:
                started = time.monotonic()
            click(browser, "Run analysis")
        texts = []
        for tab in tabs:
            browser.switch_to.window(tab)
            texts.append(page_text(browser, "Loaded: analysis of", timeout=300))
        elapsed = time.monotonic() - started
        memory = memory_kib(server.pid)
        for i, text in enumerate(texts):  # each session its own table, none another's
            assert "Traceback" not in text and "unexpected error" not in text, text
            if i < len(runs):
                assert f"— 69 rows, checkpoints session-{i}." in text, text
            else:
                rows = 3 * len(UPLOAD_TARGETS[i - len(runs)])
                assert f"— {rows} rows, checkpoints uploaded adapter." in text, text
        shot = tmp_path / "eight-sessions.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("DORA_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["DORA_SCREENSHOT_DIR"]) / shot.name)

        # Session 0 learns session 4's upload reference (here: computed) and opens a table that
        # names it: the Drill-down page refuses, uploads being kept in their own session only.
        browser.switch_to.window(tabs[0])
        foreign = da.analyze(base, uploads[0][0].parent)
        foreign["ref"] = upload_ref(uploads[0])
        foreign.to_csv(tmp_path / "foreign.csv", index=False)
        browser.find_elements("css selector", "input[type='file']")[1].send_keys(
            str(tmp_path / "foreign.csv"))
        page_text(browser, "Loaded foreign.csv")
        browser.find_element("css selector", "a[href*='drilldown']").click()
        fill(browser, "Base checkpoint (the BASE of the analysis)", str(base) + Keys.ENTER)
        try:
            text = page_text(browser, "uploads are kept only in the session that analysed them",
                             timeout=120)
        finally:
            browser.save_screenshot(str(tmp_path / "drilldown.png"))
            if os.environ.get("DORA_SCREENSHOT_DIR"):
                shutil.copy(tmp_path / "drilldown.png", os.environ["DORA_SCREENSHOT_DIR"])
        assert "Traceback" not in text
    finally:
        stop(server)
    added = (memory["VmHWM"] - started_rss) << 10
    print(f"\n{SESSIONS} sessions: all finished in {elapsed:.1f} s; server RSS at start "
          f"{started_rss >> 10} MiB, peak {memory['VmHWM'] >> 10} MiB "
          f"(+{added >> 20} MiB), now {memory['VmRSS'] >> 10} MiB")
    assert added < PEAK_ABOVE_START
