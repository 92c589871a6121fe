"""Analysis settings: one dataclass, defaults defined once, shared by the library, CLI and app."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import metrics as registry
from .columns import AXES, METHODS
from .errors import ConfigError
from .hardware import DEFAULT_BLOCK_ELEMENTS
from .io.guard import IO_BACKENDS
from .io.keys import module_kind, module_path

#: ``auto``: the weights as stored for inference; ``fp32``: full-precision masters where kept.
PRECISIONS: tuple[str, ...] = ("auto", "fp32")

#: Bootstrap resamples over layers for the interval of r (``correlate(n_boot=)``, ``--n-boot``).
N_BOOT = 1000

#: ``--axis both`` analyses each matrix along both axes (two rows per matrix).
AXIS_CHOICES: dict[str, tuple[str, ...]] = {"out": ("out",), "in": ("in",), "both": AXES}
METHOD_CHOICES: tuple[str, ...] = ("auto", *METHODS)


@dataclass(frozen=True)
class AnalysisConfig:
    """What to compare and how."""

    axis: str = "out"
    """``out`` (per output channel, as PEFT and the official DoRA code), ``in``, or ``both``."""
    modules: tuple[str, ...] | None = None
    """Keep only these modules: kinds (``q``, ``v``, ``down``, ``qkv``, ``lm_head`` …) or the
    modules' own names (``q_proj``, ``query``, ``mlp.down_proj``), as a sequence or one
    comma-separated string (``"q,v"``); None keeps all. Each entry must match a module of the
    base (:meth:`unmatched_modules`)."""
    include: str | None = None
    """Keep only parameter names matching this regular expression (``re.search``)."""
    skip_mismatched: bool = False
    """Skip (with a warning) tensors whose shapes differ instead of failing."""
    skip_vanished: bool = False
    """Leave out (with a warning) tuned checkpoints deleted while they are read — a trainer's
    ``save_total_limit`` rotation — instead of stopping (see :mod:`dora_analysis.vanished`)."""
    block_elements: int = DEFAULT_BLOCK_ELEMENTS
    """Elements per float64 working block; bounds memory for any tensor size. The default is
    chosen from this machine's caches (:func:`choose_block_elements`); a plan carries it to
    every worker, so a cluster computes with the block of the machine that planned."""
    workers: int | None = None
    """Threads computing matrix pairs at once; None: one per usable core. The table does not
    depend on it (bit for bit)."""
    progress: bool = False
    """Show a progress bar on stderr."""
    io: str = "mmap"
    """How safetensors are read: ``mmap`` (memory-mapped under a read lease and reduced in
    place, no copy; the pages read show in RSS as shared page cache, never as private memory;
    files that cannot be leased are read with ``pread``) or ``pread`` (each block copied into a
    reused buffer of the worker). ``mmap`` is the cheaper of the two (docs/performance.md)."""
    closed_form: bool = True
    """Adapters: compute axis ``out`` from ``W0 Aᵀ`` and ``A Aᵀ`` instead of materialising B·A."""
    lora_alpha: float | None = None
    """Adapters that do not store alpha (torchtune): the alpha they were trained with."""
    precision: str = "auto"
    """``auto`` reads weights as stored; ``fp32`` rebuilds full-precision master weights where the
    checkpoint keeps them (DeepSpeed ZeRO optimizer partitions)."""
    token: str | None = field(default=None, repr=False)
    """Hugging Face token for private repos (default: ``HF_TOKEN``); never printed."""
    adapter_base: str | None = None
    """Adapters: the base they were trained against when it is not BASE (PiSSA/OLoRA/CorDA's
    residual, LoftQ's quantized weights); the merge uses it, ΔM/ΔD stay measured against BASE."""
    metrics: tuple[str, ...] = ()
    """Optional metrics to compute, by switch name (``("spectrum",)``); see
    :mod:`dora_analysis.metrics`. The always-on metrics need no switch."""
    metric_settings: tuple[tuple[str, object], ...] = ()
    """``(name, value)`` pairs for metric settings; unset ones take the metric's default."""
    _include_re: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the checks below store normalised values
        if not isinstance(self.axis, str) or self.axis not in AXIS_CHOICES:
            raise ConfigError(f"--axis must be one of {', '.join(AXIS_CHOICES)}, got {self.axis!r}")
        if self.modules is not None:
            set_(self, "modules", name_list(self.modules, "--modules"))
            if not self.modules:
                raise ConfigError("--modules needs at least one module kind, e.g. --modules q,v")
        if self.include is not None:
            if not isinstance(self.include, str):
                raise ConfigError(f"--include takes one regular expression, got {self.include!r}")
            try:
                set_(self, "_include_re", re.compile(self.include))
            except re.error as exc:
                raise ConfigError(f"--include is not a valid regular expression: {exc}") from None
        for flag, value, choices in (("--io", self.io, IO_BACKENDS),
                                     ("--precision", self.precision, PRECISIONS)):
            if not isinstance(value, str) or value not in choices:
                raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        for name, value in (("skip_mismatched", self.skip_mismatched),
                            ("skip_vanished", self.skip_vanished),
                            ("progress", self.progress), ("closed_form", self.closed_form)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        if self.lora_alpha is not None and (
                isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, numbers.Real)
                or not 0 < self.lora_alpha < math.inf):
            raise ConfigError(f"--lora-alpha must be a positive number, got {self.lora_alpha!r}")
        if not whole(self.block_elements):
            raise ConfigError(f"block_elements must be a positive whole number, "
                              f"got {self.block_elements!r}")
        if self.workers is not None and not whole(self.workers):
            raise ConfigError(f"--workers must be a positive whole number, got {self.workers!r}")
        if self.token is not None and not isinstance(self.token, str):
            raise ConfigError("--token must be a string")  # never echoed: it is a secret
        if self.adapter_base is not None:
            if not isinstance(self.adapter_base, str | os.PathLike):
                raise ConfigError(f"--adapter-base takes one checkpoint reference, "
                                  f"got {self.adapter_base!r}")
            set_(self, "adapter_base", os.fspath(self.adapter_base))
        set_(self, "metrics", name_list(self.metrics, "metrics"))
        switches = registry.options()
        unknown = [m for m in self.metrics if m not in switches]
        if unknown:
            raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; available: "
                              f"{', '.join(switches) or 'none'}")
        set_(self, "metric_settings", checked_settings(self.metric_settings))
        for metric in registry.enabled(self):
            if metric.requires is not None:
                metric.requires()  # a missing optional dependency, before any file is read

    def unmatched_modules(self, names: Iterable[str]) -> list[str]:
        """The ``modules`` entries that select none of these parameter names (none when
        ``modules`` is None): each entry must match something, or it is a typo."""
        if self.modules is None:
            return []
        hit: set[str] = set()
        for name in names:
            hit.update(module_entries(name, self.modules))
        return [m for m in self.modules if m not in hit]

    @classmethod
    def from_settings(cls, **settings) -> AnalysisConfig:
        """A configuration from keywords: its fields, metric switches (``spectrum=True``) and
        metric settings (``intruder_k=20``) alike.

        Example:
            >>> AnalysisConfig.from_settings(axis="in").axis
            'in'
        """
        switches, known = registry.options(), registry.settings()
        metrics = list(name_list(settings.pop("metrics", ()), "metrics"))
        values = dict(setting_pairs(settings.pop("metric_settings", ())))
        for name in [n for n in settings if n in switches or n in known]:
            value = settings.pop(name)
            if name in switches:
                if value:
                    metrics.append(name)
            else:
                values[name] = value
        try:
            return cls(metrics=tuple(metrics), metric_settings=tuple(values.items()), **settings)
        except TypeError as exc:  # an unknown keyword
            raise ConfigError(f"unknown analysis setting ({exc})") from None

    def setting(self, name: str) -> object:
        """A metric setting's value: the one given, else the metric's default."""
        given = dict(self.metric_settings)
        return given[name] if name in given else registry.settings()[name].default

    @property
    def read_options(self):
        """The settings the checkpoint readers take (:class:`dora_analysis.io.open.ReadOptions`)."""
        from .io.open import ReadOptions  # the readers import torch; settings stay light

        return ReadOptions(backend=self.io, lora_alpha=self.lora_alpha,
                           precision=self.precision, token=self.token,
                           adapter_base=self.adapter_base)

    @property
    def axes(self) -> tuple[str, ...]:
        return AXIS_CHOICES[self.axis]

    def selects(self, name: str) -> bool:
        """Whether the matrix of this parameter name passes ``modules`` and ``include``."""
        if self.modules is not None and not any(module_entries(name, self.modules)):
            return False
        return self._include_re is None or bool(self._include_re.search(name))


def module_entries(name: str, entries: Iterable[str]) -> Iterator[str]:
    """The ``--modules`` entries that select parameter ``name``: its module kind
    (``model.layers.0.self_attn.q_proj.weight`` → ``q``), its module's own name (``q_proj``) or
    a dotted tail of the module's path (``self_attn.q_proj``).

    Example:
        >>> list(module_entries("model.layers.0.self_attn.q_proj.weight", ["q", "q_proj", "k"]))
        ['q', 'q_proj']
    """
    kind, path = module_kind(name), module_path(name)
    return (e for e in entries if e == kind or path == e or path.endswith("." + e))


def name_list(value: Any, flag: str) -> tuple[str, ...]:
    """Names given as one comma-separated string (``"q,v"``) or a sequence of strings, each
    stripped, empty ones and repeats dropped; anything else is a :class:`ConfigError` (a bare
    string is never read letter by letter).

    Example:
        >>> name_list("q, v", "--modules"), name_list(["down"], "--modules")
        (('q', 'v'), ('down',))
    """
    items = [value] if isinstance(value, str) else value
    if isinstance(items, bytes | Mapping) or not isinstance(items, Iterable):
        raise ConfigError(f"{flag} takes names, as one comma-separated string or a list of "
                          f"strings, got {value!r}")
    items = list(items)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{flag} takes names (strings), got {value!r}")
    names = (n.strip() for item in items for n in item.split(","))
    return tuple(dict.fromkeys(n for n in names if n))


def setting_pairs(value: Any) -> list[tuple[str, object]]:
    """``metric_settings`` as ``(name, value)`` pairs: a mapping or a sequence of pairs."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(pairs, str) or not isinstance(pairs, Iterable):
        raise ConfigError(f"metric_settings takes (name, value) pairs, got {value!r}")
    pairs = [tuple(p) if isinstance(p, list | tuple) else p for p in pairs]
    if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
        raise ConfigError(f"metric_settings takes (name, value) pairs, got {value!r}")
    return pairs


def checked_settings(value: Any) -> tuple[tuple[str, object], ...]:
    """Metric settings, each checked against its declaration (:class:`~dora_analysis.metrics.
    Setting`'s ``check``) and normalised; unknown names refused."""
    pairs, known = setting_pairs(value), registry.settings()
    bad = [n for n, _ in pairs if n not in known]
    if bad:
        raise ConfigError(f"unknown metric setting(s) {', '.join(bad)}; available: "
                          f"{', '.join(known) or 'none'}")
    return tuple((name, known[name].validate(v)) for name, v in dict(pairs).items())


def whole(value: Any) -> bool:
    """A positive whole number (not a bool, not a float that happens to be whole)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def check_method(method: str) -> str:
    """Validate a ``--method`` value."""
    if method not in METHOD_CHOICES:
        raise ConfigError(f"--method must be one of {', '.join(METHOD_CHOICES)}, got {method!r}")
    return method
