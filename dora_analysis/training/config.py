"""Training settings: one dataclass, validated, shared by ``train()`` and ``dora-train``.

Imports nothing heavy: ``dora-train --help`` reads its defaults from here without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..columns import TRAINED_METHODS
from ..errors import ConfigError

METHODS = TRAINED_METHODS
#: ``dora-train --task`` choices (each a class in :mod:`.tasks`).
TASKS = ("seq-cls", "causal-lm")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Older and shorter spellings accepted for ``--dtype``.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: How a ``torchrun`` job splits the model: replicated (DDP) or sharded (FSDP2 ``fully_shard``).
PARALLEL = ("ddp", "fsdp")


def canonical_dtype(name: str) -> str:
    """``bf16`` → ``bfloat16`` …; other names unchanged (validated by :class:`TrainConfig`)."""
    return DTYPE_ALIASES.get(name, name)


@dataclass
class TrainConfig:
    """How to fine-tune, where, and when to save."""

    method: str = "dora"
    """``ft`` (all weights), ``lora`` (Eq. 1) or ``dora`` (Eq. 5)."""
    targets: tuple[str, ...] = ("auto",)
    """Module names that get adapters (PEFT's suffix rule): ``q_proj``, ``query``, ``c_attn`` …;
    ``auto``: the attention query and value projections."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    """Scale by alpha / sqrt(r) instead of alpha / r."""
    detach_norm: bool = True
    """DoRA: treat ||W0 + sBA|| as a constant in backprop (paper §4.3)."""
    magnitude_only: tuple[str, ...] = ()
    """DoRA targets that train only their magnitude (paper Table 6)."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full next to the adapters (a new classification head)."""
    lr: float = 1e-4
    steps: int = 100
    batch_size: int = 16
    """Examples per micro-batch (per process under torchrun)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    warmup_steps: int = 0
    """Linear warm-up, then linear decay to zero at ``steps``."""
    weight_decay: float = 0.0
    """AdamW decay of every trainable weight except biases and norm weights."""
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_steps: tuple[int, ...] = ()
    """Steps after which ``OUTPUT/checkpoint-N/`` is written; the last step always is."""
    output: Path | None = None
    """The run folder, for ``checkpoint-N/`` (one run per folder: see :mod:`.runfolder`)."""
    overwrite: bool = False
    """Delete the outputs of an earlier run in ``output`` (for a resumed run: its checkpoints
    after the resumed step) instead of refusing to mix them with this run's."""
    device: str = "auto"
    """``auto`` (CUDA, else Apple MPS, else CPU), ``cpu``, ``cuda`` or ``mps``."""
    dtype: str = "auto"
    """Autocast precision of forward and backward; weights and optimizer stay float32. ``auto``:
    bfloat16 on GPUs that support it, else float32. float16 uses a gradient scaler."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (transformers models): less memory, ~30 % slower."""
    parallel: str = "ddp"
    """Under ``torchrun``: ``ddp`` (a replica per process) or ``fsdp`` (FSDP2, sharded)."""
    extra: dict = field(default_factory=dict)
    """Free-form facts recorded in the checkpoints (e.g. the base model's name)."""

    def __post_init__(self) -> None:
        self.dtype = canonical_dtype(self.dtype)
        checks = [
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.parallel in PARALLEL, f"--parallel must be one of {', '.join(PARALLEL)}"),
            (self.rank >= 1, "--rank must be at least 1"),
            (self.alpha > 0, "--alpha must be positive"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.lr > 0, "--lr must be positive"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.warmup_steps >= 0, "--warmup must not be negative"),
            (self.warmup_steps < self.steps, "--warmup must be below --steps"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             "--max-grad-norm must be positive (0 turns clipping off)"),
            (all(0 < s <= self.steps for s in self.save_steps),
             f"--save-steps must lie in 1..{self.steps}"),
            (self.method == "dora" or not self.magnitude_only, "--magnitude-only needs DoRA"),
            (self.method == "ft" or bool(self.targets), "--targets needs at least one name"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.targets = tuple(self.targets)
        self.save_steps = tuple(sorted(set(self.save_steps) | {self.steps}))
        if self.output is not None:
            self.output = Path(self.output)

    def to_json(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output) if self.output else None
        return data
