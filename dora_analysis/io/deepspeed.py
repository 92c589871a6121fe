"""DeepSpeed ZeRO checkpoints (``global_stepN/``), read without importing deepspeed.

Layout, as ``engine.save_checkpoint(dir)`` writes it (HF Trainer passes ``checkpoint-N/``)::

    dir/latest                                   the tag of the last save, e.g. "global_step10"
    dir/global_step10/mp_rank_00_model_states.pt             ZeRO-1/2: ``module`` = 16-bit weights
    dir/global_step10/zero_pp_rank_R_mp_rank_00_model_states.pt    ZeRO-3: placeholders only
    dir/global_step10/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt    rank R's fp32 partition

Precision ``auto`` reads the 16-bit ``module`` (ZeRO-1/2); ZeRO-3 keeps none, so its fp32
master weights are read instead, with a note. Precision ``fp32`` rebuilds the fp32 masters per
tensor from the ranks' optimizer partitions exactly as DeepSpeed's ``zero_to_fp32.py`` does
(bit for bit; buffers cast to fp32, frozen parameters as stored, shared parameters aliased):

* ZeRO-1/2: per parameter group, the ranks' partitions are consecutive slices of one flat
  vector; parameters follow each other in ``param_shapes`` order (plus any
  ``param_alignment_paddings``).
* ZeRO-3: every parameter is split into ``ceil(n / W)`` elements per rank (the last padded); rank
  R holds its piece of each parameter one after the other, across its parameter groups.

Files are loaded with ``torch.load(weights_only=True, mmap=True)``: a row block touches only the
pages it needs. The optimizer files pickle four DeepSpeed classes (loss scaler, stage enum,
fragment address); empty stand-ins are allowlisted under those names, nothing else is.

Example:
    >>> with open_zero(Path("run/checkpoint-10"), "fp32") as src:  # doctest: +SKIP
    ...     w = src.get_rows("lm_head.weight", 0, 64)  # float32 masters
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, CheckpointNotFoundError
from .base import TensorInfo, TensorSource
from .detect import LATEST_FILE, MODEL_STATES_12, find_zero, is_zero_folder  # noqa: F401
from .dtypes import name_of
from .guard import confined
from .torch_bin import TorchFile, _torch_load

log = logging.getLogger("dora_analysis")

_MODEL_STATES_3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(?P<prefix>(?:bf16_)?zero_pp_rank_)(?P<rank>\d+)"
                           r"(?P<suffix>_mp_rank_00_optim_states\.pt)$")
_MODEL_PARALLEL = re.compile(r"mp_rank_(?!00_)\d+_|^layer_\d+-model")  # tensor / pipeline parallel

#: DeepSpeed classes pickled in ZeRO optimizer files; each read as a :class:`_Stand_in`.
DEEPSPEED_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class _StandIn:
    """Takes the place of a DeepSpeed class while unpickling: keeps arguments and state, runs
    nothing (the stage enum arrives as ``_StandIn(3)``)."""

    def __init__(self, *args: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


def _load(path: Path) -> dict:
    """One ZeRO file, ``weights_only`` and memory-mapped, DeepSpeed classes as stand-ins."""
    with torch.serialization.safe_globals([(_StandIn, name) for name in DEEPSPEED_GLOBALS]):
        obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: not a DeepSpeed checkpoint file (holds a "
                                    f"{type(obj).__name__}); copy the checkpoint again")
    return obj


def open_zero(path: Path, precision: str = "auto") -> TensorSource:
    """A DeepSpeed ZeRO checkpoint: 16-bit ``module`` weights (``auto``, ZeRO-1/2) or the fp32
    master weights rebuilt from the optimizer partitions (``fp32``, and ``auto`` on ZeRO-3)."""
    folder = find_zero(path)
    if folder is None:
        raise CheckpointNotFoundError(f"{path}: holds no DeepSpeed global_stepN/ folder")
    if not folder.is_dir():
        raise CheckpointNotFoundError(
            f"{path}: {LATEST_FILE} names {folder.name}, which is missing; copy the checkpoint "
            f"with its {folder.name}/ folder, or name an existing one in {LATEST_FILE}")
    if not is_zero_folder(folder):
        raise CheckpointNotFoundError(
            f"{folder}: no {MODEL_STATES_12} or zero_pp_rank_0_mp_rank_00_model_states.pt; "
            "copy every *_model_states.pt file of the save")
    others = sorted(p.name for p in folder.iterdir() if _MODEL_PARALLEL.search(p.name))
    if others:
        raise CheckpointFormatError(
            f"{folder}: tensor- or pipeline-parallel DeepSpeed files ({others[0]} …) are not "
            "supported; convert the checkpoint with DeepSpeed's ds_to_universal.py first")
    if (folder / MODEL_STATES_12).is_file():
        if precision == "auto":
            return TorchFile(confined(folder, MODEL_STATES_12, named_by=folder))
    elif precision == "auto":
        _note_zero3(folder)
    return ZeroMasters(folder)


@functools.cache
def _note_zero3(folder: Path) -> None:
    """Said once per folder, though the analysis opens a checkpoint twice (plan, compute)."""
    log.info("%s: ZeRO-3 keeps no 16-bit weights (the model states hold placeholders); "
             "reading the fp32 master weights from the optimizer partitions", folder)


@dataclass(frozen=True)
class _Flat:
    """Where one trainable parameter lies in the ranks' fp32 partitions."""

    shape: tuple[int, ...]
    group: int  # ZeRO-1/2: its parameter group; ZeRO-3: unused
    offset: int  # ZeRO-1/2: in the group's flat vector; ZeRO-3: in each rank's partition
    per_rank: int  # ZeRO-3: elements per rank (ceil(n / W)); ZeRO-1/2: unused


class ZeroMasters(TensorSource):
    """The fp32 master weights of a ZeRO-1/2/3 checkpoint, rebuilt per tensor and row block.

    Equal, bit for bit, to DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        found = self._optim_files()
        first_file = found[min(found)]
        first = _optimizer_state(_load(first_file), first_file)
        self._stage = _stage(first, first_file)
        world = first.get("partition_count")
        world = max(world) if isinstance(world, list) else world
        if not isinstance(world, int) or world < 1:
            raise CheckpointFormatError(f"{first_file}: no partition_count; copy the "
                                        "checkpoint again")
        missing = [r for r in range(world) if r not in found]
        if missing:
            names = [_OPTIM_STATES.sub(rf"\g<prefix>{r}\g<suffix>", first_file.name)
                     for r in missing]
            raise CheckpointNotFoundError(
                f"{self.path}: {', '.join(names)} missing (the fp32 partition of rank "
                f"{missing[0]} of {world}); copy every *_optim_states.pt file of the save")
        if len(found) != world:
            raise CheckpointFormatError(
                f"{self.path}: {len(found)} *_optim_states.pt files, but the ZeRO partitions "
                f"are of {world} ranks (an older save left over?); keep the files of one save")
        self._world = world
        optim = [found[r] for r in range(world)]
        key = "single_partition_of_fp32_groups" if self._stage <= 2 else "fp32_flat_groups"
        # rank → its fp32 partition of each parameter group (memory-mapped)
        self._groups: list[list[torch.Tensor]] = []
        for rank, file in enumerate(optim):
            state = first if rank == 0 else _optimizer_state(_load(file), file)
            groups = state.get(key)
            if not isinstance(groups, list) or not all(torch.is_tensor(g) for g in groups):
                raise CheckpointFormatError(f"{file}: no fp32 partitions ('{key}'); copy the "
                                            "checkpoint again")
            self._groups.append([g.detach() for g in groups])  # optimizer params: grad on
        paddings = first.get("param_alignment_paddings")
        states = self._model_states()
        self._tensors: dict[str, torch.Tensor] = {}  # buffers and frozen parameters, whole
        self._flat: dict[str, _Flat] = {}
        self._aliases: dict[str, str] = {}
        module = states[0].get("module") or {}
        for name in states[0].get("buffer_names") or []:
            if torch.is_tensor(module.get(name)):
                t = module[name].detach()
                self._tensors[name] = t.float() if t.is_floating_point() else t
        self._frozen(states)
        shapes = states[0].get("param_shapes") or []
        if self._stage <= 2:
            self._place_zero2(shapes, paddings)
        else:
            self._place_zero3(shapes)
        for alias, source in (states[0].get("shared_params") or {}).items():
            if source in self._tensors or source in self._flat:
                self._aliases[alias] = source

    # -- files ---------------------------------------------------------------------------------

    def _optim_files(self) -> dict[int, Path]:
        """Rank → its ``*_optim_states.pt`` file."""
        found = {int(m.group("rank")): confined(self.path, p.name, named_by=self.path)
                 for p in self.path.iterdir() if (m := _OPTIM_STATES.match(p.name))}
        if not found:
            raise CheckpointNotFoundError(
                f"{self.path}: no ZeRO optimizer partitions (*_optim_states.pt) to rebuild the "
                "fp32 master weights from; copy them, or read the 16-bit weights with "
                "--precision auto (ZeRO-1/2)")
        return found

    def _model_states(self) -> list[dict]:
        if self._stage <= 2:
            return [_load(confined(self.path, MODEL_STATES_12, named_by=self.path))]
        files = [confined(self.path, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                          named_by=self.path) for r in range(self._world)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{self.path}: {', '.join(missing)} missing; copy "
                                          "every *_model_states.pt file of the save")
        return [_load(f) for f in files]

    # -- where each tensor lies -----------------------------------------------------------------

    def _frozen(self, states: list[dict]) -> None:
        """Frozen parameters: whole in rank 0's model states (ZeRO-1/2), split per rank (3)."""
        shapes = states[0].get("frozen_param_shapes") or {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            try:
                if self._stage <= 2:
                    self._tensors[name] = states[0]["frozen_param_fragments"][name].detach()
                else:
                    pieces = [s["frozen_param_fragments"][name] for s in states]
                    whole = torch.cat(pieces, 0).narrow(0, 0, n).view(shape)
                    self._tensors[name] = whole.detach()
            except (KeyError, TypeError):
                raise CheckpointFormatError(f"{self.path}: frozen parameter '{name}' has no "
                                            "stored fragment; copy the checkpoint again") from None

    def _place_zero2(self, shapes: list[dict], paddings: list | None) -> None:
        if len(shapes) != len(self._groups[0]):
            raise self._mismatch(f"{len(shapes)} parameter groups, "
                                 f"{len(self._groups[0])} fp32 partitions")
        for g, group_shapes in enumerate(shapes):
            offset = 0
            for i, (name, shape) in enumerate(group_shapes.items()):
                self._flat[name] = _Flat(tuple(shape), g, offset, 0)
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
            # DeepSpeed pads each group to a multiple of 2·W (zero_to_fp32's sanity check)
            align = 2 * self._world
            avail = sum(len(rank[g]) for rank in self._groups)
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise self._mismatch(f"group {g} needs {offset} elements, the partitions "
                                     f"hold {avail}")

    def _place_zero3(self, shapes: list[dict]) -> None:
        offset = 0
        for group_shapes in shapes:
            for name, shape in group_shapes.items():
                per_rank = math.ceil(math.prod(shape) / self._world)
                self._flat[name] = _Flat(tuple(shape), 0, offset, per_rank)
                offset += per_rank
        held = sum(len(g) for g in self._groups[0])
        if offset != held:
            raise self._mismatch(f"the parameters need {offset} elements per rank, rank 0 "
                                 f"holds {held}")

    def _mismatch(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.path}: the optimizer partitions do not match the "
                                     f"model's param_shapes ({what}); the files are from "
                                     "different saves, copy the checkpoint again")

    # -- reading ---------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return [*self._tensors, *self._flat, *self._aliases]

    def info(self, name: str) -> TensorInfo:
        name = self._aliases.get(name, name)
        if name in self._tensors:
            t = self._tensors[name]
            return TensorInfo(tuple(t.shape), name_of(t.dtype))
        return TensorInfo(self._flat[name].shape, name_of(self._groups[0][0].dtype))

    def get_tensor(self, name: str) -> torch.Tensor:
        name = self._aliases.get(name, name)
        if name in self._tensors:
            return self._tensors[name]
        shape = self._flat[name].shape
        flat = self._elements(self._flat[name], 0, math.prod(shape))
        return flat.view(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        name = self._aliases.get(name, name)
        if name in self._tensors:
            return self._tensors[name][start:stop]
        place = self._flat[name]
        stop = min(stop, place.shape[0])
        row = math.prod(place.shape[1:])
        flat = self._elements(place, start * row, max(start, stop) * row)
        return flat.view(max(0, stop - start), *place.shape[1:])

    def _elements(self, place: _Flat, begin: int, end: int) -> torch.Tensor:
        """Elements ``begin:end`` of one parameter's flattened fp32 master, as one tensor."""
        if self._stage <= 2:
            # the group's flat vector is the ranks' partitions one after the other
            pieces = _concat_slice([rank[place.group] for rank in self._groups],
                                   place.offset + begin, place.offset + end)
        else:
            # rank r holds elements [r·p, (r+1)·p) of the parameter, at place.offset of its
            # partitions taken as one vector (a parameter may straddle two groups)
            pieces, p = [], place.per_rank
            for rank in range(begin // p, (end - 1) // p + 1 if end > begin else 0):
                lo, hi = max(begin - rank * p, 0), min(end - rank * p, p)
                pieces += _concat_slice(self._groups[rank], place.offset + lo, place.offset + hi)
        if not pieces:
            return torch.empty(0, dtype=self._groups[0][0].dtype)
        return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)

    def close(self) -> None:
        self._groups, self._tensors = [], {}


def _concat_slice(tensors: list[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
    """Elements ``lo:hi`` of the 1-D tensors taken one after the other, as views of each."""
    pieces, start = [], 0
    for t in tensors:
        stop = start + len(t)
        if lo < stop and hi > start:
            pieces.append(t[max(lo - start, 0): min(hi, stop) - start])
        start = stop
    return pieces


def _optimizer_state(obj: dict, path: Path) -> dict:
    state = obj.get("optimizer_state_dict")
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: not a ZeRO optimizer file (no "
                                    "'optimizer_state_dict'); copy the checkpoint again")
    return state


def _stage(state: dict, path: Path) -> int:
    stage = state.get("zero_stage")
    stage = stage.args[0] if isinstance(stage, _StandIn) and stage.args else stage
    if not isinstance(stage, int) or not 0 <= stage <= 3:
        raise CheckpointFormatError(f"{path}: unknown ZeRO stage {stage!r}; only ZeRO-1/2/3 "
                                    "checkpoints are read")
    return stage
