"""Error bounds for spectra taken from Gram matrices: what ``--spectrum`` and ``--intruders``
certify before they use a fast result, and why a float32 basis of W0 is enough.

Notation: X is an m × n matrix with m ≥ n (the metrics transpose a wide matrix first), its Gram
matrix G = XᵀX (n × n), σ₁ ≥ … ≥ σₙ its singular values, u the unit roundoff of the working
precision (2⁻⁵³ for float64, 2⁻²⁴ for float32).

**Rounding model.** An inner product of length L computed in floating point satisfies
``|fl(aᵀb) − aᵀb| ≤ c(L)·|a|ᵀ|b|``. The worst case is c(L) = L·u (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §3.1); under the usual model of independent
rounding errors it is c(L) = λ·√L·u with probability at least 1 − 2L·exp(−λ²(1 − u)²/2)
(Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
41(5), 2019, Thm 2.4). We use λ = :data:`LAMBDA` = 10 (failure probability below 1e-18 per inner
product, below 1e-10 for all entries of a 16 384² Gram matrix). LAPACK's symmetric eigensolvers
are backward stable with a "modestly growing" p(n) (LAPACK Users' Guide §4.7, which takes
p(n) = 1 in practice); we take p(n) = λ·√n, the same model. The tests check the bounds against
dense float64 SVDs on well- and ill-conditioned, square and non-square matrices.

**1. Eigenvalues of the Gram matrix** (:func:`gram_error`). Ĝ = G + E with
``|E| ≤ c(m)·|X|ᵀ|X|`` entrywise, so ``‖E‖₂ ≤ ‖E‖_F ≤ c(m)·‖X‖_F²``; the eigensolver returns the
exact eigenvalues λ̂ᵢ of Ĝ + F with ``‖F‖₂ ≤ c(n)·‖Ĝ‖₂``. By Weyl's inequality

    |λ̂ᵢ − σᵢ²| ≤ δ := c(m)·‖X‖_F² + c(n)·λ̂₁          (for every i).

So σᵢ ∈ [√max(λ̂ᵢ − δ, 0), √(λ̂ᵢ + δ)] (:func:`sigma_intervals`): relative error ≈ δ/(2σᵢ²) for
σᵢ ≫ √δ, while σᵢ below ~√δ ≈ √(λ·√m·u)·‖X‖_F keep no relative accuracy at all. Whether that
matters depends on the summary; each is certified from these intervals:

* σ₁: relative error ≤ δ/(2λ̂₁) + O(δ²) — about c(m)·stable rank: ~1e-13 at 4096².
* ‖X‖_F² = trace(Ĝ) (diagonal entries are sums of squares): relative error ≤ c(m). Stable rank
  ‖X‖_F²/σ₁²: both bounds added.
* Energy rank (the smallest k whose σ₁² + … + σₖ² reach 90 % of ‖X‖_F²): by Ky Fan's
  inequality a partial sum of k eigenvalues moves by at most k·δ, so k is certified when the
  90 % line lies outside those intervals for k − 1 and k (:func:`energy_rank`).
* Effective rank exp(H), H = −Σ pᵢ log pᵢ, pᵢ = σᵢ/S, S = Σσⱼ (Roy & Vetterli 2007), where small
  σᵢ enter S linearly: ∂H/∂σⱼ = −(log pⱼ + H)/S. Moving one coordinate at a time through the box
  of intervals [loⱼ, hiⱼ], with Ŝ, Ĥ the computed values and S ∈ [S_lo, S_hi],

      |H − Ĥ| ≤ B = (Σⱼ Iⱼ/S_lo + W·a) / (1 − W),   Iⱼ = ∫_{loⱼ}^{hiⱼ} |log(x/Ŝ) + Ĥ| dx,

  W = Σⱼ(hiⱼ − loⱼ)/S_lo, a = log(S_hi/S_lo) (the drift of log S and H along the path), so
  exp(H) has relative error ≤ e^B − 1 (:func:`effective_rank_error`). Values near e^{−Ĥ}·Ŝ — the
  bulk — cost nothing to first order; the price is paid by σⱼ ≪ Ŝ/exp(Ĥ), of which a
  full-fine-tuning update has few: ~3e-8 on the 4096² benchmark pair.
* Amplification ‖X‖_F / ‖Uᵀ W0 V‖_F, U, V the top-r singular vectors (:func:`subspace_error`):
  the top-r eigenvectors V̂ of Ĝ are refined once on X itself (Rayleigh–Ritz: X·V̂ = Q·R,
  R = P·Σ̃·Wᵀ, Ũ = Q·P, Ṽ = V̂·W); the residuals R = XṼ − ŨΣ̃, S = XᵀŨ − ṼΣ̃, computed on X (their
  own rounding bounded by c(n)·‖X‖_F·√r and c(m)·‖X‖_F·√r), bound the angles by Wedin's theorem
  (Stewart & Sun, *Matrix Perturbation Theory*, Thm V.4.4):

      √(‖sinΘ_U‖_F² + ‖sinΘ_V‖_F²) ≤ η := √(‖R‖_F² + ‖S‖_F²) / (σ̃_r − hi_{r+1}).

  Then |‖ŨᵀW0Ṽ‖_F − ‖UᵀW0V‖_F| ≤ 2·η·(max(‖W0Ṽ‖₂, ‖W0ᵀŨ‖₂) + √2·η·‖W0‖_F), relative to
  ‖ŨᵀW0Ṽ‖_F. No gap (σ_r = σ_{r+1}) means no certificate: the top-r subspace is then not
  determined by ΔW, for the dense SVD either.

**2. Eigenvectors: W0's basis for the intruder test** (:func:`clusters`). Eigenvalues closer
than :data:`CLUSTER_GAP` × δ are grouped; by the Davis–Kahan sinθ theorem (Stewart & Sun
Thm V.3.6) the computed basis of a cluster C is within the angle ``θ_C ≤ δ/(d_C − δ)`` of the
exact invariant subspace, d_C the distance from C's eigenvalues to the others. For a tall
matrix, whose left basis is X·V̂·Σ̂⁻¹, the angle grows to at most (σ₁/σ_min(C))·tan θ_C. For a
unit vector y known to within the angle η_y, every exact singular vector u of a cluster C has
``|⟨y, u⟩| ≤ ‖P̂_C y‖ + θ_C + √2·sin η_y``, and some has at least
``(‖P̂_C y‖ − θ_C − √2·sin η_y)/√|C|``: the intruder test max |⟨y, u⟩| < ε is decided exactly
(for any basis an exact SVD could return) unless ε lies between the two (:func:`intruder_status`).

**Float32 storage.** The basis is computed in float64 and stored in float32 (the SVD cache):
rounding each entry moves a unit column by at most u₃₂ = 2⁻²⁴ ≈ 6e-8 in norm, so every
cosine moves by at most 6e-8 and a cluster's projection by u₃₂·√|C| — added to the margin above.
The reference implementations (Shuttleworth et al.; PEFT's ``intruders.py``) compute whole SVDs
in float32 with ε = 0.5 and no margin at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: λ of the probabilistic rounding model: c(n) = λ·√n·u.
LAMBDA = 10.0
U64 = 2.0**-53  # unit roundoff of float64
U32 = 2.0**-24  # of float32
#: Eigenvalues closer than this many δ form one cluster of the intruder basis.
CLUSTER_GAP = 1e3
#: What a fast result must be certified to (relative): the contract is 1e-6 against a dense
#: float64 SVD, whose own error on these summaries stays below 1e-7 (see the tests).
TOLERANCE = 9e-7


def rounding(n: int, unit: float = U64) -> float:
    """c(n) = λ·√n·u: the relative error of an inner product of length n (rounding model)."""
    return LAMBDA * math.sqrt(max(n, 1)) * unit


def gram_error(frobenius_sq: float, inner: int, size: int, top: float) -> float:
    """δ: a bound on |λ̂ᵢ − σᵢ²| for the eigenvalues λ̂ of a float64 Gram matrix of ``size``
    rows formed from inner products of length ``inner``, ``top`` its largest eigenvalue."""
    return rounding(inner) * frobenius_sq + rounding(size) * max(top, 0.0)


def sigma_intervals(eigenvalues: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Intervals ``[lo, hi]`` holding the exact σᵢ, from eigenvalues within ``delta`` of σᵢ²."""
    return (np.sqrt(np.maximum(eigenvalues - delta, 0.0)),
            np.sqrt(np.maximum(eigenvalues + delta, 0.0)))


def effective_rank_error(sigma: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """A bound on the relative error of exp(H) computed from ``sigma`` when the exact σⱼ lie
    in ``[lo, hi]`` (§1 of the module docstring); inf when the box is too wide."""
    total = float(sigma.sum())
    s_lo, s_hi = float(lo.sum()), float(hi.sum())
    if total <= 0 or s_lo <= 0:
        return math.inf
    p = sigma[sigma > 0] / total
    entropy = float(-(p * np.log(p)).sum())

    def antiderivative(x: np.ndarray) -> np.ndarray:  # ∫ (log(x/Ŝ) + Ĥ) dx, 0 at x = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(x > 0, x * (np.log(x / total) + entropy - 1.0), 0.0)

    middle = np.clip(total * math.exp(-entropy), lo, hi)  # where log(x/Ŝ) + Ĥ changes sign
    integral = float((antiderivative(lo) + antiderivative(hi) - 2 * antiderivative(middle)).sum())
    width = float((hi - lo).sum()) / s_lo
    if width >= 0.5:
        return math.inf
    bound = (integral / s_lo + width * math.log(s_hi / s_lo)) / (1 - width)
    bound += rounding(len(sigma)) * (1 + float(np.abs(np.log(p)).max()))  # evaluating H itself
    return math.expm1(bound)


#: A share counts as reached within this relative tolerance: k equal singular values hold
#: exactly i/k of the energy after i of them, which rounding must not push past the line.
SHARE_SLACK = 1e-12


def energy_rank(eigenvalues: np.ndarray, total: float, share: float, delta: float,
                total_error: float = 0.0) -> int | None:
    """The smallest k whose k largest eigenvalues (σ²) hold ``share`` of ``total``, or None when
    the perturbation bounds (k·δ on a partial sum, ``total_error`` relative on the total) leave
    two candidates."""
    line = share * (1 - SHARE_SLACK)
    partial = np.cumsum(eigenvalues)
    k = int(np.searchsorted(partial / total, line)) + 1
    if k > len(eigenvalues):
        return None
    hi_total, lo_total = total * (1 + total_error), total * (1 - total_error)
    reached = partial[k - 1] - k * delta >= line * hi_total
    short = k == 1 or partial[k - 2] + (k - 1) * delta < line * lo_total
    return k if reached and short else None


@dataclass(frozen=True)
class Subspaces:
    """Top-r singular subspaces of X refined on X (Rayleigh–Ritz), with Wedin's angle bound."""

    left: np.ndarray
    """Ũ (m × r), orthonormal columns."""
    right: np.ndarray
    """Ṽ (n × r)."""
    values: np.ndarray
    """σ̃ (r,), descending."""
    angle: float
    """η: √(‖sinΘ_U‖_F² + ‖sinΘ_V‖_F²) ≤ η; inf when no gap separates the r from the rest."""


def subspace_error(x: np.ndarray, v_top: np.ndarray, next_sigma_hi: float) -> Subspaces:
    """Refine the top-r right singular vectors ``v_top`` of ``x`` (n × r, from its Gram matrix)
    by one Rayleigh–Ritz step on ``x`` and bound the angles to the exact subspaces (Wedin);
    ``next_sigma_hi`` bounds σ_{r+1} from above (0 when r = n)."""
    m, n = x.shape
    r = v_top.shape[1]
    q, rr = np.linalg.qr(x @ v_top)  # (m, r), (r, r)
    p, values, wt = np.linalg.svd(rr)
    left, right = q @ p, v_top @ wt.T
    res_r = x @ right - left * values
    res_s = x.T @ left - right * values
    fro = math.sqrt(float(np.einsum("ij,ij->", x, x)))
    slack = (rounding(n) + rounding(m)) * fro * math.sqrt(r)
    orth = max(float(np.abs(left.T @ left - np.eye(r)).max()),
               float(np.abs(right.T @ right - np.eye(r)).max())) * r
    residual = math.hypot(float(np.linalg.norm(res_r)), float(np.linalg.norm(res_s)))
    # Wedin wants orthonormal columns: orthonormalising moves each by ≤ orth, the residuals by
    # ≤ 2·orth·σ₁ and the subspaces by ≤ orth.
    residual += slack + 2 * orth * float(values[0])
    gap = float(values[-1]) - next_sigma_hi
    angle = residual / gap + orth if gap > 0 and orth < 1e-6 else math.inf
    return Subspaces(left, right, values, angle)


def projection_error(w0: np.ndarray, sub: Subspaces, projected: float) -> float:
    """Relative error bound of ‖ŨᵀW0Ṽ‖_F = ``projected`` against the exact subspaces."""
    if not math.isfinite(sub.angle) or projected <= 0:
        return math.inf
    # spectral norms of the thin products (an r × r eigenproblem each): ‖AB‖_F ≤ ‖A‖_F·‖B‖₂
    scale = max(float(np.linalg.norm(w0 @ sub.right, 2)), float(np.linalg.norm(w0.T @ sub.left,
                                                                                2)))
    w0_fro = math.sqrt(float(np.einsum("ij,ij->", w0, w0)))
    error = 2 * sub.angle * (scale + math.sqrt(2) * sub.angle * w0_fro)
    error += sum(rounding(d) for d in w0.shape) * w0_fro * math.sqrt(len(sub.values))  # ŨᵀW0Ṽ
    return error / projected


@dataclass(frozen=True)
class Clusters:
    """A grouping of a basis's columns (sorted by eigenvalue) with the angle bound of each."""

    starts: np.ndarray
    """First column of each cluster; the last cluster ends at the last column."""
    angles: np.ndarray
    """θ_C per cluster (inf: no bound)."""

    def sizes(self, total: int) -> np.ndarray:
        return np.diff(np.append(self.starts, total))


def clusters(eigenvalues: np.ndarray, delta: float) -> Clusters:
    """Group descending ``eigenvalues`` (each within ``delta`` of the exact one) into clusters
    separated by more than :data:`CLUSTER_GAP`·δ, each with its Davis–Kahan angle bound."""
    n = len(eigenvalues)
    gaps = -np.diff(eigenvalues)  # gaps[i] = λ̂ᵢ − λ̂ᵢ₊₁ ≥ 0
    starts = np.concatenate([[0], np.nonzero(gaps > CLUSTER_GAP * delta)[0] + 1]).astype(np.int64)
    ends = np.append(starts[1:], n)
    around = np.concatenate([[np.inf], gaps, [np.inf]])  # around[i]: the gap just above λ̂ᵢ
    separation = np.minimum(around[starts], around[ends])  # d_C
    with np.errstate(divide="ignore", invalid="ignore"):
        angles = np.where(separation > delta, delta / (separation - delta), np.inf)
    return Clusters(starts, angles)


def intruder_status(coefficients: np.ndarray, groups: Clusters, margin: np.ndarray,
                    eps: float) -> np.ndarray:
    """For each column j of ``coefficients`` (basis columns × tested vectors, ``⟨û_i, ŷ_j⟩``):
    1 if certainly an intruder (every exact |cos| < ε), 0 if certainly not, −1 if undecided.

    ``margin[C]`` is the angle bound of cluster C plus its storage rounding; the tested vectors'
    own angle bounds are added by the caller into ``margin`` per vector (shape clusters × k).
    """
    n = coefficients.shape[0]
    sizes = groups.sizes(n)
    projected = np.sqrt(np.add.reduceat(coefficients**2, groups.starts, axis=0))  # (C, k)
    upper = projected + margin
    lower = (projected - margin) / np.sqrt(sizes)[:, None]
    status = np.full(coefficients.shape[1], -1, dtype=np.int64)
    status[np.all(upper < eps, axis=0)] = 1
    status[np.any(lower >= eps, axis=0)] = 0
    return status


def norm_ratio_error(num: float, num_error: float, den: float, den_error: float) -> float:
    """A bound on |N/M − N̂/M̂| when |N − N̂| ≤ ``num_error`` and |M − M̂| ≤ ``den_error``
    (``num`` = N̂, ``den`` = M̂ > 0): ``(num_error + (N̂/M̂)·den_error) / (M̂ − den_error)``;
    inf when the denominator is not certainly positive. ``--drift``'s spectral drift: N̂ =
    ‖σ̂(Wt) − σ̂(W0)‖₂, M̂ = ‖σ̂(W0)‖₂, whose errors are at most ‖e₀ + e_t‖₂ and ‖e₀‖₂ for
    per-value bounds |σ̂ᵢ − σᵢ| ≤ eᵢ (triangle inequality; the evaluation's own rounding,
    c(n) relative, is added by the caller)."""
    if not den - den_error > 0:
        return math.inf
    return (num_error + num / den * den_error) / (den - den_error)


def overlap_error(angle_a: float, angle_b: float, k: int, length: int) -> float:
    """A bound on the error of ‖ÃᵀB̃‖²_F / k against the exact ‖AᵀB‖²_F / k for k-column bases
    whose subspaces are within ``angle_a``, ``angle_b`` of the exact ones (‖sinΘ‖_F, e.g.
    Wedin's η of :func:`subspace_error`), vectors of ``length`` entries.

    With P = AAᵀ the orthogonal projectors, ‖AᵀB‖²_F = ⟨P_A, P_B⟩_F and ‖P̃ − P‖_F = √2·‖sinΘ‖_F,
    so |⟨P̃_A, P̃_B⟩ − ⟨P_A, P_B⟩| ≤ √k·(‖P̃_A − P_A‖_F + ‖P̃_B − P_B‖_F) ≤ √(2k)·(η_a + η_b);
    the k² inner products of ÃᵀB̃ add c(length) each (unit vectors), 2√k·c(length) to the mean.
    """
    if not (math.isfinite(angle_a) and math.isfinite(angle_b)) or k <= 0:
        return math.inf
    return math.sqrt(2.0) * (angle_a + angle_b) / math.sqrt(k) + 2 * math.sqrt(k) * rounding(
        length)
