"""The results cache: one entry per matrix pair, so that a run killed at any moment (SIGKILL
included) and started again computes only what is missing, and ends with the same table, bit for
bit.

An entry holds one pair's metric values (axis → column → value; the row's labels, step and
reference are the plan's, so a relabelled run still finds them), floats as their 8 bytes: exact,
NaN payloads included. Its key is a SHA-256 of everything that changes those values:

* both checkpoints' identity (:mod:`.identity`: every file a reader may open, by stat and
  content digest, or by the remote storage's content id) and that of ``adapter_base``;
* the pair: base and tuned names, shape, stored dtypes, layout (transposed), expert;
* every setting but those that only choose pairs or how they are run (``modules``, ``include``,
  ``workers`` …): axis, block size, closed form, precision, ``lora_alpha``, the enabled metrics
  and every metric setting (defaults included);
* the code: :data:`SCHEMA`, a digest of the package's own source files, and the versions of the
  libraries that compute (torch, numpy, scipy, numba, weightwatcher) — a new kernel never serves
  an old kernel's numbers.

A result is stored only if the checkpoint's files still have the stamps they had when the run
began (a file replaced meanwhile is never stored under the old file's identity). Where the cache
folder cannot be used the run goes on uncached, with one ``note:``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import platform
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CacheError
from .identity import Identity, checkpoint_identity
from .location import cache_root

if TYPE_CHECKING:
    from ..analysis import Plan, TunedCheckpoint
    from .store import Store

log = logging.getLogger("dora_analysis")

#: Bumped when what an entry holds, or how it is keyed, changes.
SCHEMA = "pair-values-v1"
#: Settings that choose which pairs are analysed, or how the work is spread, never a pair's
#: numbers (every other field of :class:`~dora_analysis.config.AnalysisConfig` is in the key;
#: ``adapter_base`` by the identity of what it names).
NOT_IN_KEY = frozenset({"modules", "include", "skip_mismatched", "skip_vanished", "workers",
                        "progress", "token", "adapter_base", "metric_settings"})
#: Libraries whose version can change a computed number.
COMPUTING_LIBRARIES = ("torch", "numpy", "scipy", "numba", "weightwatcher")
#: Parts of the package that compute nothing a table holds.
NOT_COMPUTING = ("training", "cli.py", "console.py", "report.py", "plots.py")

Values = dict[str, dict[str, object]]
PairIndex = tuple[int, int]


def cache_folder(cache: Any) -> Path | None:
    """The folder ``analyze(cache=...)`` names: None or False → no cache; True → the default
    (:func:`~dora_analysis.cache.location.cache_root`); a path → that folder."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return cache_root()
    return Path(cache).expanduser()


# --- entries ----------------------------------------------------------------------------------

class Unencodable(ValueError):
    """A value the cache does not hold exactly (the pair is computed, not stored)."""


def _encode_value(value: object) -> list:
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):
        return ["i", value]
    if isinstance(value, float):
        return ["f", struct.pack("<d", value).hex()]
    if isinstance(value, str):
        return ["s", value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
        return _encode_value(value.item())
    raise Unencodable(f"cannot cache a value of type {type(value).__name__}")


def _decode_value(item: list) -> object:
    tag = item[0]
    if tag == "f":
        return struct.unpack("<d", bytes.fromhex(item[1]))[0]
    if tag == "n":
        return None
    if tag in ("b", "i", "s"):
        return item[1]
    raise ValueError(f"unknown tag {tag!r}")


def encode(values: Values) -> bytes:
    """One pair's values as bytes; floats exactly (their IEEE 754 bytes).

    Example:
        >>> v = {"out": {"delta_m": 0.1, "zero_vectors": 0, "warnings": "", "x": None}}
        >>> decode(encode(v)) == v
        True
    """
    return json.dumps({axis: [[col, *_encode_value(v)] for col, v in row.items()]
                       for axis, row in values.items()}, separators=(",", ":")).encode()


def decode(data: bytes) -> Values:
    """The values :func:`encode` wrote (``ValueError`` for anything else)."""
    try:
        raw = json.loads(data)
        return {axis: {item[0]: _decode_value(item[1:]) for item in row}
                for axis, row in raw.items()}
    except (TypeError, KeyError, IndexError, AttributeError, struct.error) as exc:
        raise ValueError(f"not a cache entry ({exc})") from None


# --- keys -------------------------------------------------------------------------------------

@functools.cache
def code_fingerprint() -> str:
    """SHA-256 of the package's computing source files, the computing libraries' versions and
    the machine type (computed once per process)."""
    from importlib import metadata

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(SCHEMA.encode())
    for file in sorted(package.rglob("*.py")):
        relative = file.relative_to(package).as_posix()
        if relative.startswith(NOT_COMPUTING):
            continue
        digest.update(relative.encode() + b"\0" + file.read_bytes() + b"\0")
    for name in COMPUTING_LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}={version}\0".encode())
    digest.update(platform.machine().encode())
    return digest.hexdigest()


def settings_fingerprint(config) -> list:
    """Every setting that can change a pair's values (see :data:`NOT_IN_KEY`)."""
    from .. import metrics as registry

    fields = [[f.name, repr(getattr(config, f.name))] for f in dataclasses.fields(config)
              if f.init and f.name not in NOT_IN_KEY]
    settings = [[name, repr(config.setting(name))] for name in sorted(registry.settings())]
    return [fields, settings]


def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=repr).encode()).hexdigest()


# --- one run ----------------------------------------------------------------------------------

class PairResults:
    """The pair values of one run: those computed so far (kept in memory, so a run that drops
    a vanished checkpoint and goes on computes nothing twice) and, with a store, those of
    earlier runs.

    :meth:`known` gives what a plan need not compute, :meth:`recorder` what to call with each
    pair computed; entries are stored as they come (one transaction each).
    """

    def __init__(self, work: Plan, store: Store | None) -> None:
        self.store = store
        self._memory: dict[tuple[TunedCheckpoint, int], Values] = {}
        self._keys: dict[TunedCheckpoint, tuple[list[str | None], Identity | None]] = {}
        self.hits = self.computed = 0
        if store is not None:
            self._keyed(work)

    def _keyed(self, work: Plan) -> None:
        """Each job's pair keys (None where a checkpoint cannot be told apart from a rewrite)."""
        config = work.config
        token = config.token
        base = checkpoint_identity(work.base, token)
        adapter_base = None
        if config.adapter_base is not None:
            from ..io.open import resolve
            from ..io.refs import CheckpointRef

            try:
                adapter_base = checkpoint_identity(
                    resolve(CheckpointRef.parse(config.adapter_base), token)[0], token)
            except Exception:  # the plan has opened it; here it is only keyed
                adapter_base = None
        context = [code_fingerprint(), settings_fingerprint(config),
                   base and base.digest, adapter_base and adapter_base.digest]
        cacheable = base is not None and (config.adapter_base is None or adapter_base is not None)
        for job in work.jobs:
            ck = job.checkpoint
            if ck in self._keys:
                continue
            tuned = checkpoint_identity(ck.path, token) if cacheable else None
            if tuned is None:
                self._keys[ck] = ([None] * len(job.pairs), None)
                continue
            job_context = _sha(*context, tuned.digest, job.adapter)
            keys = [_sha(job_context, repr(pair)) for pair in job.pairs]
            stamps = Identity(tuned.digest, tuned.stamps + (base.stamps if base else ()))
            self._keys[ck] = (keys, stamps)
        self._load(work)

    def _load(self, work: Plan) -> None:
        """Read every stored entry of the plan once."""
        wanted = {key: (job.checkpoint, p) for job in work.jobs
                  for p, key in enumerate(self._keys[job.checkpoint][0]) if key is not None}
        axes = list(work.config.axes)
        for key, data in self.store.get_many(wanted).items():
            try:
                values = decode(data)
            except ValueError:
                continue  # not an entry this version wrote: computed again, then replaced
            if list(values) != axes or not all(isinstance(r, dict) for r in values.values()):
                continue
            self._memory[wanted[key]] = values
            self.hits += 1

    def known(self, work: Plan) -> dict[PairIndex, Values]:
        """The values of the plan's pairs that need no computing, by (job, pair) index."""
        return {(j, p): self._memory[(job.checkpoint, p)]
                for j, job in enumerate(work.jobs) for p in range(len(job.pairs))
                if (job.checkpoint, p) in self._memory}

    def recorder(self, work: Plan) -> Callable[[int, int, Values], None]:
        """What the executor calls with each pair it has computed, by index into ``work``."""

        def record(j: int, p: int, values: Values) -> None:
            ck = work.jobs[j].checkpoint
            self._memory[(ck, p)] = values
            self.computed += 1
            if self.store is not None and ck in self._keys:
                keys, identity = self._keys[ck]
                if keys[p] is not None and identity.unchanged():
                    try:
                        self.store.put(keys[p], encode(values))
                    except Unencodable:
                        pass
                    except Exception as exc:  # a full disk, a damaged file: the run goes on
                        self._give_up(exc)

        return record

    def _give_up(self, exc: Exception) -> None:
        log.info("results cache %s: cannot be written (%s); the run goes on without it",
                 self.store.folder, exc)
        self.store.close()
        self.store = None

    def report(self, total: int) -> None:
        """One note when some pairs came from the cache."""
        if self.store is not None and self.hits:
            log.info("results cache %s: %d of %d matrix pairs read from it, %d computed",
                     self.store.folder, self.hits, total, self.computed)


def clear(folder: Path) -> tuple[int, int]:
    """Empty the results cache in ``folder``: (bytes, entries) removed; nothing is created where
    there is no cache. A folder where it cannot be cleared is a :class:`CacheError`."""
    import sqlite3

    from .store import FILE_NAME, Store

    if not (folder / FILE_NAME).is_file():
        return 0, 0
    try:
        with Store(folder) as store:
            return store.clear()
    except (OSError, sqlite3.Error) as exc:
        raise CacheError(f"{folder}: cannot clear the results cache ({exc}); remove the folder "
                         f"(rm -rf {folder}) to start afresh") from None


def open_store(folder: Path | None) -> Store | None:
    """The store in ``folder``, or None (with a note) when it cannot be used there."""
    if folder is None:
        return None
    import sqlite3

    from .store import Store

    try:
        return Store(folder)
    except (OSError, sqlite3.Error) as exc:
        log.info("results cache %s: cannot be used (%s); running without it (--cache DIR "
                 "chooses another folder, --no-cache turns it off)", folder, exc)
        return None


@contextmanager
def pair_results(work: Plan, cache: Any) -> Iterator[PairResults]:
    """The :class:`PairResults` of one run with ``analyze``'s ``cache=`` (see
    :func:`cache_folder`); the store is closed afterwards."""
    store = open_store(cache_folder(cache))
    results = None
    try:
        try:
            results = PairResults(work, store)
        except Exception as exc:  # sqlite3.DatabaseError: a damaged file; reading it failed
            if store is None:
                raise
            log.info("results cache %s: cannot be read (%s); running without it (dora-analyze "
                     "--clear-cache empties it)", store.folder, exc)
            store.close()
            store = None
            results = PairResults(work, None)
        yield results
    finally:
        if results is not None and results.store is not None:
            results.store.close()
        elif store is not None:
            store.close()
