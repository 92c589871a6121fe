"""Which format a local path holds, from file names and tensor names alone.

Everything :mod:`dora_analysis.io.open` needs to choose a reader, without importing the readers
themselves (several of which need torch): a safetensors checkpoint is recognised and opened
without loading torch.

Example:
    >>> adapter_format(["layers.0.attn.q_proj.lora_a.weight", "layers.0.attn.q_proj.magnitude"])
    'torchtune'
"""

from __future__ import annotations

import re
from pathlib import Path

from .guard import confined
from .refs import TRAINER_DCP_FOLDERS

# --- adapters ----------------------------------------------------------------------------------

#: A PEFT adapter folder's weights, in order of preference.
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
#: Single adapter files without a PEFT config, recognised by a key suffix: (format, suffixes;
#: the first one decides). Their readers: ``dora_analysis.io.adapters.ADAPTER_READERS``.
ADAPTER_FILE_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torchtune", (".lora_a.weight", ".magnitude")),
    ("lycoris", (".lora_down.weight", ".dora_scale")),
)


def adapter_format(keys: list[str]) -> str | None:
    """The adapter format a file's tensor names reveal (None for a full checkpoint)."""
    for name, suffixes in ADAPTER_FILE_KEYS:
        if any(k.endswith(suffixes[0]) for k in keys):
            return name
    return None


def is_adapter_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def has_adapter_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ADAPTER_WEIGHT_FILES)


# --- PyTorch Distributed Checkpoint ------------------------------------------------------------

METADATA_FILE = ".metadata"


def is_dcp_folder(path: Path) -> bool:
    """A folder holding a DCP ``.metadata`` file."""
    return (path / METADATA_FILE).is_file()


def find_dcp(path: Path) -> Path | None:
    """The DCP folder a reference names: the folder itself, or the model DCP of a Trainer /
    accelerate ``checkpoint-N/`` (``pytorch_model_fsdp_0/``); else None.

    Example:
        >>> find_dcp(Path("run/checkpoint-10"))  # doctest: +SKIP
        PosixPath('run/checkpoint-10/pytorch_model_fsdp_0')
    """
    if not path.is_dir():
        return None
    if is_dcp_folder(path):
        return path
    for name in TRAINER_DCP_FOLDERS:
        if is_dcp_folder(path / name):
            return confined(path, name, named_by=path)
    return None


# --- DeepSpeed ZeRO ----------------------------------------------------------------------------

LATEST_FILE = "latest"
MODEL_STATES_12 = "mp_rank_00_model_states.pt"
GLOBAL_STEP = re.compile(r"^global_step\d+$")


def is_zero_folder(path: Path) -> bool:
    """A ``global_stepN``-style folder: DeepSpeed model states of ZeRO-1/2 or ZeRO-3."""
    return (path / MODEL_STATES_12).is_file() or (
        path / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()


def find_zero(path: Path) -> Path | None:
    """The ZeRO folder a reference names: the folder itself; the tag in its ``latest`` file
    (``checkpoint-N/`` of HF Trainer, a DeepSpeed save folder); or its one ``global_step*``.

    Example:
        >>> find_zero(Path("run/checkpoint-10"))  # doctest: +SKIP
        PosixPath('run/checkpoint-10/global_step10')
    """
    if not path.is_dir():
        return None
    if is_zero_folder(path):
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        confined(path, LATEST_FILE, named_by=path)  # never the text of a file elsewhere
        try:
            tag = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            tag = ""
        if tag:  # a tag that leads out of the folder is refused here; a missing one when opened
            return confined(path, tag, named_by=latest)
    steps = [c for c in path.iterdir() if GLOBAL_STEP.match(c.name) and is_zero_folder(c)]
    return confined(path, steps[0].name, named_by=path) if len(steps) == 1 else None
