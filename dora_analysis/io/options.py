"""How checkpoints are read: :class:`ReadOptions`, shared by every reader (each uses what applies
to it), and the defaults it names."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .guard import IO_BACKENDS

#: Seconds before a connection or a read of remote storage is given up (HTTP and S3).
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class ReadOptions:
    """How checkpoints are read (shared by every format; each uses what applies to it)."""

    backend: str = "mmap"
    """Safetensors: ``mmap`` (touched pages count in RSS as page cache) or ``pread``."""
    lora_alpha: float | None = None
    """Adapters that do not store alpha (torchtune): the alpha they were trained with."""
    precision: str = "auto"
    """``auto`` reads the weights as the checkpoint stores them for inference; ``fp32`` asks for
    full-precision master weights where the format keeps them (DeepSpeed ZeRO)."""
    token: str | None = field(default=None, repr=False)
    """Hugging Face token for private repos (default: ``HF_TOKEN``); never printed."""
    adapter_base: str | None = None
    """Adapters: a reference to the base they were trained against when it is not BASE."""
    timeout: float = DEFAULT_TIMEOUT
    """Remote storage: seconds before a connection or a read is given up."""
    retries: int | None = None
    """Remote storage: retries of a transient fault; None: ``DORA_ANALYSIS_RETRIES``, else 4."""

    def __post_init__(self) -> None:
        if self.backend not in IO_BACKENDS:
            raise ConfigError(f"--io must be one of {', '.join(IO_BACKENDS)}, got {self.backend!r}")


#: The options of a reader given none.
DEFAULT_OPTIONS = ReadOptions()
