"""One matrix in detail: the per-vector numbers behind a table row, and both spectra.

The table reduces each matrix to means (Eqs. 3-4). :func:`matrix_detail` keeps the arrays: per
vector the base and tuned norms (Eq. 2), the signed change ``m_t − m_0`` whose absolute mean is
ΔM, ``1 − cos`` whose mean is ΔD, the tangential share of ``‖Δw‖²``; the singular values of ΔW
and of W0; and, for the intruder test, the best ``|cos|`` of each top singular vector of Wt with
W0's. The dashboard's drill-down and :func:`dora_analysis.plots.drilldown_figure` draw them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis import pair_sums, plan
from .config import AnalysisConfig
from .decompose import direction_change
from .errors import ConfigError, TensorMismatchError
from .io.open import open_checkpoint
from .metrics import intruders, linalg
from .metrics.spectrum import delta_svd
from .metrics.tangential import tangential_share
from .pairs import PairView


@dataclass(frozen=True)
class MatrixDetail:
    """Per-vector arrays and spectra of one weight matrix of one tuned checkpoint."""

    name: str
    checkpoint: str
    axis: str
    expert: int | None
    m0: np.ndarray
    """Eq. 2: base norm of each vector along ``axis``."""
    mt: np.ndarray
    """Eq. 2: tuned norm of each vector."""
    one_minus_cos: np.ndarray
    """Eq. 4 summand per vector (NaN for a zero vector)."""
    tangential_share: np.ndarray
    """Share of ``‖Δw‖²`` orthogonal to ``w0`` per vector (NaN where nothing changed)."""
    sigma_delta: np.ndarray | None
    """Singular values of ΔW, decreasing (None unless ``spectrum``)."""
    sigma_base: np.ndarray | None
    """Singular values of W0, decreasing (None unless ``spectrum``)."""
    intruder_cos: np.ndarray | None
    """For each of the top-k left singular vectors of Wt, its best ``|cos|`` with W0's."""
    intruder_eps: float = 0.5

    @property
    def delta_m(self) -> np.ndarray:
        """Signed magnitude change ``m_t − m_0`` per vector (Eq. 3 averages its absolute value)."""
        return self.mt - self.m0

    def vectors(self) -> pd.DataFrame:
        """One row per vector: ``m0, mt, delta_m, one_minus_cos, tangential_share``."""
        return pd.DataFrame({"vector": np.arange(len(self.m0)), "m0": self.m0, "mt": self.mt,
                             "delta_m": self.delta_m, "one_minus_cos": self.one_minus_cos,
                             "tangential_share": self.tangential_share})


def matrix_detail(base: str | Path, tuned: str | Path, name: str, *, axis: str = "out",
                  expert: int | None = None, spectrum: bool = True, intruder_k: int = 0,
                  intruder_eps: float = 0.5, device: str = "cpu",
                  svd_cache: str | None = None) -> MatrixDetail:
    """The arrays behind one row of the table (see the module docstring).

    ``tuned`` is one checkpoint (a series' ``checkpoint-N`` folder: the table's ``ref``);
    ``name`` the parameter name in the base (the table's ``name``); ``expert`` picks one expert
    of a fused MoE tensor. ``spectrum`` adds both spectra (dense SVDs); ``intruder_k > 0`` the
    intruder test's cosines (with the base SVD cache of ``--intruders``).

    Example:
        >>> d = matrix_detail("base/", "run/checkpoint-300",  # doctest: +SKIP
        ...                   "model.layers.3.self_attn.q_proj.weight")
        >>> d.vectors().describe()  # doctest: +SKIP
    """
    if not isinstance(axis, str) or axis not in ("out", "in"):
        raise ConfigError(f"axis must be 'out' or 'in', got {axis!r}")
    if not isinstance(name, str):
        raise ConfigError(f"name must be one parameter name (a string), got {name!r}")
    if expert is not None and (isinstance(expert, bool) or not isinstance(expert, int)):
        raise ConfigError(f"expert must be a whole number or None, got {expert!r}")
    settings = {"device": device, "svd_cache": svd_cache, "intruder_eps": intruder_eps}
    if intruder_k != 0:  # 0: no intruder test
        settings["intruder_k"] = intruder_k
    config = AnalysisConfig(axis=axis, include=f"^{re.escape(name)}$",
                            metric_settings=tuple(settings.items()))  # checked there
    intruder_eps = config.setting("intruder_eps")
    try:
        work = plan(base, tuned, config=config)
    except TensorMismatchError:
        raise ConfigError(f"{name}: no weight matrix of that name in both {base} and "
                          f"{tuned}") from None
    if len(work.jobs) != 1:
        raise ConfigError(f"{tuned}: a series of {len(work.jobs)} checkpoints; name one of "
                          "them (its checkpoint-N folder)")
    job = work.jobs[0]
    pairs = [p for p in job.pairs if p.expert == expert]
    if not pairs:
        experts = sorted(p.expert for p in job.pairs if p.expert is not None)
        raise ConfigError(f"{name}: no expert {expert}" + (
            f"; it has experts {experts[0]}…{experts[-1]}" if experts else
            "; it is not an expert tensor (leave expert out)"))
    options = config.read_options
    with open_checkpoint(work.base, options) as base_src, \
            open_checkpoint(job.checkpoint.path, options, base=base_src) as tuned_src:
        view = PairView(pairs[0], base_src, tuned_src, config,
                        pair_sums(base_src, tuned_src, pairs[0], config), axis)
        sums = view.sums()
        sigma_delta = sigma_base = cosines = None
        dev = linalg.resolve_device(device) if spectrum or intruder_k else None
        if spectrum:
            svd = delta_svd(view, dev, vectors=False)
            sigma_delta = None if svd is None else svd[1].numpy()
            sigma_base = linalg.dense_svd(view.base_weight(), dev, vectors=False)[1].numpy()
        if intruder_k:
            found = intruders.intruder_cosines(view, intruder_k, dev,
                                               intruders.cache_dir(svd_cache))
            cosines = None if found is None else found.numpy()
    valid = (sums.sq0 > 0) & (sums.sqt > 0)
    return MatrixDetail(
        name=name, checkpoint=str(job.checkpoint.ref), axis=axis, expert=expert,
        m0=np.sqrt(sums.sq0), mt=np.sqrt(sums.sqt),
        one_minus_cos=np.where(valid, direction_change(sums), np.nan),
        tangential_share=tangential_share(sums),
        sigma_delta=sigma_delta, sigma_base=sigma_base, intruder_cos=cosines,
        intruder_eps=intruder_eps,
    )
