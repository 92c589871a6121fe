"""Training settings: one dataclass, validated, shared by ``train()`` and ``dora-train``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

METHODS = ("ft", "lora", "dora")
DTYPES = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """How to fine-tune, and when to save."""

    method: str = "dora"
    """``ft`` (all weights), ``lora`` (Eq. 1) or ``dora`` (Eq. 5)."""
    targets: tuple[str, ...] = ("query", "value")
    """Module names that get adapters (PEFT's suffix rule): ``q_proj``, ``query``, ``c_attn`` …"""
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
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    warmup_steps: int = 0
    """Linear warm-up, then linear decay to zero at ``steps``."""
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_steps: tuple[int, ...] = ()
    """Steps after which ``OUTPUT/checkpoint-N/`` is written; the last step always is."""
    output: Path | None = None
    dtype: str = "fp32"
    """``bf16`` runs forward and backward under CPU/GPU autocast; weights stay fp32."""
    extra: dict = field(default_factory=dict)
    """Free-form facts recorded in the checkpoints (e.g. the base model's name)."""

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
            (self.rank >= 1, "--rank must be at least 1"),
            (self.alpha > 0, "--alpha must be positive"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.lr > 0, "--lr must be positive"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (0 <= self.warmup_steps < self.steps, "--warmup must be below --steps"),
            (all(0 < s <= self.steps for s in self.save_steps),
             f"--save-steps must lie in 1..{self.steps}"),
            (self.method == "dora" or not self.magnitude_only, "--magnitude-only needs DoRA"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.targets = tuple(self.targets)
        self.save_steps = tuple(sorted(set(self.save_steps) | {self.steps}))
        if self.output is not None:
            self.output = Path(self.output)

    def to_json(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output) if self.output else None
        return data
