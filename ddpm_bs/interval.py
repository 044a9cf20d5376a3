"""Locate the significant interval t_δ with optimal transport (the paper's §3.2).

Theorem 1 bounds the 2-Wasserstein distance between two forward-diffused distributions,
W₂(μ_t, μ̂_t) ≤ e^{−K t} W₂(μ_0, μ̂_0) (Eq. 6), and Proposition 2 calls the timesteps where
W₂ has fallen below δ·W₂(μ_0, μ̂_0) (Eq. 7) insignificant. DDPM-BS samples the timesteps before
that point, the significant interval {1..t_δ}, with probability p. This module measures the
curve t ↦ W₂(μ_t, μ̂_t) for two image sets A and B with entropic optimal transport (Eq. 8,
ott-jax's Sinkhorn, squared Euclidean cost) and reads t_δ off it.

Estimators (all estimate W₂² and are in squared pixel units):

* ``'naive'``: the transport cost ⟨P_ε, C⟩ between A_t and B_t noised independently, Eq. 8 as
  written. It *rises* with t: in high dimension two finite noisy sets are far apart because
  of the noise alone (their cost grows like 2d(1−ᾱ_t)), which swamps the data term (DESIGN.md
  measured 1,390 → 6,046 from t = 0 to 999 for n = 500, d = 3,072). It is always reported, so
  the reason for the others is visible.
* ``'debiased_baseline'`` (the default): OT(A_t, B_t) − ½[OT(A_t, A′_t) + OT(B_t, B′_t)],
  transport costs, with A′_t, B′_t the same images noised again independently. The baseline
  terms hold the noise-to-noise cost of a pair with *equal* distributions, so the difference
  keeps the data term only; it decays as Theorem 1 predicts and reaches ≈ 0 (DESIGN.md
  measured 1,390 → 772 → 36 → ≈ 0 at t = 0, 200, 400, 600, linear schedule).
* ``'sinkhorn_divergence'``: S_ε(A_t, B_t) = OT_ε(A_t, B_t) − ½[OT_ε(A_t, A_t) + OT_ε(B_t, B_t)]
  with regularised costs (Feydy et al. 2019; ott's `sinkhorn_divergence`). It removes the
  entropic bias, but its self terms compare a noisy set with itself (the same noise), so they
  do not contain the noise-to-noise cost of independently noised sets: it rises like the naive
  curve (DESIGN measured 1,222 → 5,332).

The curve W(t) = √max(estimate, 0) is the W₂ estimate; the normalised curve W(t)/W(t₀) (t₀
the first grid point, normally 0) is averaged over noise seeds, `fit_decay_rate` fits Eq. 6
as log W(t)/W(0) ≈ −K·s(t) with s(t) = −log ᾱ_t (the integrated β of the VP SDE; a pure
translation of the data decays with K = ½), and `locate_t_delta` returns Proposition 2's
crossing point as the 1-based t_δ that `config.timesteps.t_delta` takes.

How it is computed, and why it is fast:

* Each seed draws one noise per image (ξ_A, ξ_B, and ξ_A′, ξ_B′ for the baseline) and keeps it
  for every t (common random numbers): x_t = √ᾱ_t x + √(1−ᾱ_t) ξ as `diffusion.q_sample`.
  The curve is then smooth in t, and consecutive Sinkhorn problems are close, so each t is
  warm-started from the previous t's potentials inside a `lax.scan`.
* Dense mode (``batch_size=None``): with the noise fixed, the cost matrix of a pair is
  C_t = ᾱ_t·‖x_i − y_j‖² + (1−ᾱ_t)·‖ξ_i − η_j‖² + 2√(ᾱ_t(1−ᾱ_t))·⟨x_i − y_j, ξ_i − η_j⟩, so
  three [n, m] matrices, each a float32 GEMM computed once per seed, give C_t at every t for
  O(nm) work: no d-dimensional work inside the loop over t.
* Online mode (``batch_size`` set): the noised sets are formed with `diffusion.q_sample` at each
  t and the cost is recomputed `batch_size` rows at a time inside every Sinkhorn iteration
  (ott's `PointCloud`, with its online kernel replaced: ott-jax 0.6.0's is broken on JAX ≥ 0.9),
  so memory is O((n+m)·d + batch_size·max(n, m)); use it when the [n, m] matrices do not fit.
  Both modes give the same numbers (to float32 rounding).
* ε_t = epsilon_rel × mean(C_t of the pair (A_t, B_t)), shared by all pairs at that t so the
  entropic biases of the terms match. Costs are divided by that mean inside the solver, so the
  potentials carried from t to t are on the same scale.

Timestep indices are 0-based (t = 0 the least noisy); only `locate_t_delta` converts to the
paper's 1-based t_δ.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ott.geometry import geometry as ott_geometry
from ott.geometry import pointcloud
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn

from ddpm_bs import artifacts, diffusion, schedules
from ddpm_bs import data as data_lib

ESTIMATORS = ("debiased_baseline", "naive", "sinkhorn_divergence")

# A pair is (x set, y set, x noise, y noise); sets 'a'/'b', noises 'a', 'b', 'a2', 'b2'.
PAIRS = {
    "ab": ("a", "b", "a", "b"),  # the naive Eq. 8 term
    "aa_prime": ("a", "a", "a", "a2"),  # baseline: A_t against A′_t, the same images re-noised
    "bb_prime": ("b", "b", "b", "b2"),
    "aa": ("a", "a", "a", "a"),  # Sinkhorn-divergence self terms OT_ε(A_t, A_t)
    "bb": ("b", "b", "b", "b"),
}
_ESTIMATOR_PAIRS = {
    "naive": ("ab",),
    "debiased_baseline": ("ab", "aa_prime", "bb_prime"),
    "sinkhorn_divergence": ("ab", "aa", "bb"),
}
_SYMMETRIC = ("aa", "bb")  # x = y and the same noise: ott's symmetric Sinkhorn updates
_NOISES = ("a", "b", "a2", "b2")
_HIGHEST = jax.lax.Precision.HIGHEST  # keep ‖x‖² − 2x·y + ‖y‖² out of TF32 on GPUs
_INTERVAL_STREAM = 0x1D7  # fold_in constant: the locator's noise is its own stream of config.seed
_PERTURB_STREAM = 0x1D8


# --------------------------------------------------------------------------------------------
# The curve


@dataclasses.dataclass(frozen=True)
class W2Curve:
    """The W₂ curve of two image sets under forward diffusion. Arrays are numpy.

    S = number of noise seeds, K = number of grid timesteps.

    Attributes:
      timesteps: [K] int, the 0-based grid, increasing.
      num_timesteps: T of the schedule.
      schedule: the schedule's name.
      s: [K] s(t) = −log ᾱ_t, the integrated β of the VP SDE at the grid points.
      estimator: the estimator of `estimate` (one of `ESTIMATORS`).
      epsilon: [S, K] the entropic regularisation ε used at each (seed, t), in cost units.
      transport: pair name → [S, K] transport cost ⟨P_ε, C⟩ (pairs: see `PAIRS`).
      regularized: pair name → [S, K] regularised cost ⟨P_ε, C⟩ + ε·KL(P_ε | a⊗b) (Eq. 8).
      converged: pair name → [S, K] bool, Sinkhorn reached `threshold`.
      iterations: pair name → [S, K] int, Sinkhorn iterations run.
      estimates: estimator name → [S, K] W₂² estimate, for every estimator whose pairs were
        solved (always 'naive').
      estimate: [S, K] the W₂² estimate of `estimator`.
      ratio: [K] the normalised curve W(t)/W(t₀) = √max(mean_s r_s(t), 0), r_s(t) =
        estimate_s(t)/estimate_s(t₀) the W₂² ratio of seed s (averaged before the root so that
        noise around 0 cancels; NaN where estimate(t₀) ≤ 0).
      ratio_band: [2, K] √max(mean_s r_s ∓ std_s r_s, 0): the ±1 std band over seeds.
      naive_ratio, naive_ratio_band: the same for the naive estimate.
      decay_rate: K of Eq. 6 fitted to `ratio` by `fit_decay_rate` (NaN if no point fits).
      num_a, num_b: sizes of the two sets.
      dim: d, the flattened image dimension.
      epsilon_rel, threshold, max_iterations, batch_size: the solver settings.
      seconds: wall time of the computation.
    """

    timesteps: np.ndarray
    num_timesteps: int
    schedule: str
    s: np.ndarray
    estimator: str
    epsilon: np.ndarray
    transport: dict[str, np.ndarray]
    regularized: dict[str, np.ndarray]
    converged: dict[str, np.ndarray]
    iterations: dict[str, np.ndarray]
    estimates: dict[str, np.ndarray]
    estimate: np.ndarray
    ratio: np.ndarray
    ratio_band: np.ndarray
    naive_ratio: np.ndarray
    naive_ratio_band: np.ndarray
    decay_rate: float
    num_a: int
    num_b: int
    dim: int
    epsilon_rel: float
    threshold: float
    max_iterations: int
    batch_size: int | None
    seconds: float

    @property
    def num_seeds(self) -> int:
        return int(self.estimate.shape[0])

    def to_json(self) -> dict[str, Any]:
        """Every number as JSON-able lists (per-seed arrays as [S][K] nested lists)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, dict):
                value = {k: np.asarray(v).tolist() for k, v in value.items()}
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            out[field.name] = value
        out["num_seeds"] = self.num_seeds
        return out


def grid(num_timesteps: int, num_t: int) -> np.ndarray:
    """`num_t` 0-based timesteps spread evenly over [0, T−1], both ends included. int [≤ num_t]."""
    if not isinstance(num_t, (int, np.integer)) or num_t < 2:
        raise ValueError(f"num_t must be an integer ≥ 2, got {num_t!r}.")
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, num_t)).astype(np.int64))


def seed_noise(
    key: jax.Array, seed_index: int, num_a: int, num_b: int, dim: int
) -> dict[str, jax.Array]:
    """The noise `w2_curve` draws for one seed: name → [n, d] float32 standard normal.

    'a' and 'b' noise A and B; 'a2' and 'b2' noise the baseline copies A′ and B′. Each is drawn
    from `fold_in(fold_in(key, seed_index), i)`, so it does not depend on the estimator.
    """
    k = jax.random.fold_in(key, seed_index)
    sizes = {"a": num_a, "b": num_b, "a2": num_a, "b2": num_b}
    return {
        name: jax.random.normal(jax.random.fold_in(k, i), (sizes[name], dim), jnp.float32)
        for i, name in enumerate(_NOISES)
    }


def w2_curve(
    images_a: np.ndarray | jax.Array,
    images_b: np.ndarray | jax.Array,
    *,
    schedule: str,
    num_timesteps: int,
    timesteps: Sequence[int] | np.ndarray,
    key: jax.Array,
    num_seeds: int = 3,
    estimator: str = "debiased_baseline",
    all_estimators: bool = False,
    epsilon_rel: float = 0.02,
    batch_size: int | None = None,
    max_iterations: int = 1000,
    threshold: float = 1e-3,
    inner_iterations: int = 2,
    chunk_size: int = 10,
    progress: bool = False,
) -> W2Curve:
    """The W₂ curve t ↦ W₂(μ_t, μ̂_t) of two image sets (the paper's Figure 1b, Eqs. 6 and 8).

    For each seed and grid t the sets are noised as `diffusion.q_sample` does, A_t = √ᾱ_t A +
    √(1−ᾱ_t) ξ_A (and B_t, A′_t, B′_t alike, each with its own noise, fixed across t), and
    every pair the estimator needs is solved by ott-jax's Sinkhorn with uniform weights,
    cost C(x, y) = ‖x − y‖² and ε_t = epsilon_rel × mean C(A_t, B_t) (Eq. 8), warm-started
    from the previous t. See the module docstring for the estimators and the speed-ups.

    Args:
      images_a: [n, H, W, C] (or [n, d]) images in [−1, 1], the samples of μ_0.
      images_b: [m, H, W, C] images of the same shape, the samples of μ̂_0.
      schedule: VP schedule name ('linear' or 'cosine').
      num_timesteps: T.
      timesteps: [K] distinct 0-based timesteps in [0, T), increasing; the curve is
        normalised by its first point (include 0 for W(t)/W(0)). See `grid`.
      key: PRNG key of the noise (see `seed_noise`).
      num_seeds: independent noise draws the curve is averaged over, ≥ 1.
      estimator: 'debiased_baseline' (default; decays), 'naive' (Eq. 8 as written; rises) or
        'sinkhorn_divergence' (rises); see the module docstring.
      all_estimators: also solve the pairs of the other estimators, so that `estimates`
        holds all three (up to 5 Sinkhorn problems per t instead of ≤ 3).
      epsilon_rel: ε_t = epsilon_rel × the mean cost of (A_t, B_t), > 0.
      batch_size: None for dense cost matrices (fast; about three [n, m] float32 matrices per
        Sinkhorn pair); an integer for the online cost, recomputed `batch_size` rows at a time
        (memory O((n + m)·d); each Sinkhorn iteration then does the d-dimensional GEMMs).
      max_iterations: Sinkhorn iterations per problem, ≥ 1.
      threshold: Sinkhorn stops when the L1 error of the marginals is below this, > 0.
      inner_iterations: iterations between two error checks.
      chunk_size: timesteps per compiled `lax.scan`; progress is logged after each chunk.
      progress: log a line per chunk of timesteps with absl logging.

    Returns:
      A `W2Curve`.

    Raises:
      ValueError: on empty or mismatched sets, a bad grid, or an unknown estimator, naming
        the argument.
    """
    start = time.perf_counter()
    a, b = _as_flat(images_a, "images_a"), _as_flat(images_b, "images_b")
    if a.shape[1] != b.shape[1] or np.shape(images_a)[1:] != np.shape(images_b)[1:]:
        raise ValueError(
            f"images_a and images_b must have the same image shape, got "
            f"{tuple(np.shape(images_a)[1:])} and {tuple(np.shape(images_b)[1:])}."
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    betas = schedules.betas64(schedule, num_timesteps)  # validates schedule and T
    t_grid = _check_timesteps(timesteps, num_timesteps)
    _check_int("num_seeds", num_seeds, 1)
    _check_int("max_iterations", max_iterations, 1)
    _check_int("inner_iterations", inner_iterations, 1)
    _check_int("chunk_size", chunk_size, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    _check_positive("epsilon_rel", epsilon_rel)
    _check_positive("threshold", threshold)

    ac64 = np.cumprod(1.0 - betas)[t_grid]  # ᾱ_t at the grid, float64
    pair_names = _pairs_for(estimator, all_estimators)
    solve = functools.partial(
        _solve_seed,
        pair_names=pair_names,
        schedule_obj=schedules.schedule_from_betas(betas, schedule),
        epsilon_rel=float(epsilon_rel),
        batch_size=batch_size,
        solver_options=(float(threshold), int(max_iterations), int(inner_iterations)),
        chunk_size=int(chunk_size),
        progress=progress,
    )
    a_dev, b_dev = jnp.asarray(a), jnp.asarray(b)
    per_seed = []
    for seed in range(num_seeds):
        noise = seed_noise(key, seed, a.shape[0], b.shape[0], a.shape[1])
        per_seed.append(solve(a_dev, b_dev, noise, t_grid, seed=seed, num_seeds=num_seeds))
    dtypes = {"transport": np.float64, "regularized": np.float64, "converged": bool}
    dtypes["iterations"] = np.int64
    stacked = {  # field → pair → [S, K]; costs in float64 so that differences stay exact
        field: {p: np.stack([r[field][p] for r in per_seed]).astype(dt) for p in pair_names}
        for field, dt in dtypes.items()
    }
    eps = np.stack([r["epsilon"] for r in per_seed]).astype(np.float64)  # [S, K]
    estimates = _estimates(stacked["transport"], stacked["regularized"])
    ratio, ratio_band = _normalised(estimates[estimator])
    naive_ratio, naive_band = _normalised(estimates["naive"])
    s = -np.log(ac64)
    not_converged = {p: int((~c).sum()) for p, c in stacked["converged"].items() if (~c).any()}
    if not_converged:
        logging.warning(
            "Sinkhorn did not reach threshold=%g within max_iterations=%d for %s (of %d "
            "problems per pair); raise max_iterations or epsilon_rel.",
            threshold,
            max_iterations,
            not_converged,
            num_seeds * len(t_grid),
        )
    return W2Curve(
        timesteps=t_grid,
        num_timesteps=int(num_timesteps),
        schedule=schedule,
        s=s,
        estimator=estimator,
        epsilon=eps,
        transport=stacked["transport"],
        regularized=stacked["regularized"],
        converged=stacked["converged"],
        iterations=stacked["iterations"],
        estimates=estimates,
        estimate=estimates[estimator],
        ratio=ratio,
        ratio_band=ratio_band,
        naive_ratio=naive_ratio,
        naive_ratio_band=naive_band,
        decay_rate=fit_decay_rate(s, ratio),
        num_a=int(a.shape[0]),
        num_b=int(b.shape[0]),
        dim=int(a.shape[1]),
        epsilon_rel=float(epsilon_rel),
        threshold=float(threshold),
        max_iterations=int(max_iterations),
        batch_size=None if batch_size is None else int(batch_size),
        seconds=time.perf_counter() - start,
    )


def _pairs_for(estimator: str, all_estimators: bool) -> tuple[str, ...]:
    if not all_estimators:
        return _ESTIMATOR_PAIRS[estimator]
    return tuple(p for p in PAIRS if any(p in ps for ps in _ESTIMATOR_PAIRS.values()))


def _estimates(
    transport: Mapping[str, np.ndarray], regularized: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every estimator whose pairs were solved: name → [S, K] W₂² estimate."""
    out = {"naive": transport["ab"]}
    if "aa_prime" in transport:
        out["debiased_baseline"] = transport["ab"] - 0.5 * (
            transport["aa_prime"] + transport["bb_prime"]
        )
    if "aa" in regularized:
        out["sinkhorn_divergence"] = regularized["ab"] - 0.5 * (
            regularized["aa"] + regularized["bb"]
        )
    return out


def _normalised(estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The W₂ ratio W(t)/W(t₀) and its band, from the per-seed W₂² ratios r_s(t).

    r_s = estimate_s(t)/estimate_s(t₀) is averaged over seeds *before* the square root, so
    that estimates scattered around 0 at large t average out instead of being rectified.

    Returns:
      ratio [K] = √max(mean r, 0) and band [2, K] = √max(mean r ∓ std r, 0) (NaN where a
      seed has estimate(t₀) ≤ 0).
    """
    e0 = estimate[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(e0 > 0, estimate / np.where(e0 > 0, e0, 1.0), np.nan)
    mean, std = r.mean(axis=0), r.std(axis=0)
    root = lambda v: np.sqrt(np.maximum(v, 0.0))
    return root(mean), np.stack([root(mean - std), root(mean + std)])


def fit_decay_rate(s: np.ndarray, ratio: np.ndarray, *, min_ratio: float = 0.1) -> float:
    """K of Theorem 1 (Eq. 6): least squares of log W(t)/W(0) ≈ −K·s(t), through the origin.

    The fit uses the leading run of grid points whose ratio is above `min_ratio`, up to the
    first one at or below it: W = 0 has no logarithm, and the tail of the curve is the
    estimator's noise floor (a W₂ ratio of 0.01–0.05 for a few hundred images), whose points
    at large s would otherwise dominate the slope.

    Args:
      s: [K] s(t) = −log ᾱ_t at the grid points, increasing.
      ratio: [K] the normalised curve W(t)/W(0).
      min_ratio: the level where the fitted part of the curve ends, in (0, 1).

    Returns:
      K in units of s (½ when the two distributions differ by a translation, since then
      W(t) = √ᾱ_t·W(0)), or NaN when no point with s > 0 qualifies.
    """
    s, ratio = np.asarray(s, np.float64), np.asarray(ratio, np.float64)
    if s.shape != ratio.shape or s.ndim != 1:
        raise ValueError(f"s and ratio must be 1-D of equal length, got {s.shape}, {ratio.shape}.")
    above = np.isfinite(ratio) & (ratio > min_ratio)
    end = int(np.argmin(above)) if not above.all() else len(ratio)
    keep = np.arange(len(ratio)) < end
    keep &= s > 0
    if not keep.any():
        return float("nan")
    return float(-np.sum(s[keep] * np.log(ratio[keep])) / np.sum(s[keep] ** 2))


# --------------------------------------------------------------------------------------------
# Locating t_δ (Proposition 2)


@dataclasses.dataclass(frozen=True)
class Located:
    """Where the normalised curve crosses δ.

    Attributes:
      t_delta: the paper's 1-based t_δ in [1, T] (0-based index + 1), what
        `config.timesteps.t_delta` takes.
      fraction: t_δ / T.
      crossed: whether the curve fell below δ on the grid (if not, t_δ = T).
      t_cross: the 0-based crossing point, interpolated (float; T−1 if not crossed).
    """

    t_delta: int
    fraction: float
    crossed: bool
    t_cross: float


def locate_t_delta(
    curve: W2Curve | np.ndarray,
    delta: float,
    *,
    timesteps: Sequence[int] | np.ndarray | None = None,
    num_timesteps: int | None = None,
) -> Located:
    """Proposition 2 (Eq. 7): the first t with W(t) ≤ δ·W(0), as the paper's 1-based t_δ.

    The crossing is interpolated linearly between the last grid point at or above δ and the
    first one below it, t* = t_{k−1} + (r_{k−1} − δ)/(r_{k−1} − r_k)·(t_k − t_{k−1}); the
    first integer timestep at or after t* is the 0-based index i = ⌈t*⌉, and t_δ = i + 1
    (Algorithm 1's significant interval {1..t_δ} then ends at the first insignificant step,
    which both intervals share). If the curve never falls below δ, t_δ = T and `crossed` is
    False (the whole range is significant; a warning is logged).

    Args:
      curve: a `W2Curve` (its `ratio` is used), or a [K] array of ratios W(t)/W(0).
      delta: δ in (0, 1).
      timesteps: [K] 0-based grid of an array `curve`; ignored for a `W2Curve`.
      num_timesteps: T of an array `curve`; ignored for a `W2Curve`.

    Returns:
      A `Located` (t_delta 1-based, fraction t_δ/T).

    Raises:
      ValueError: δ outside (0, 1), or a curve without finite points, naming the argument.
    """
    delta = _check_delta("delta", delta)
    if isinstance(curve, W2Curve):
        ratio, t_grid, total = curve.ratio, curve.timesteps, curve.num_timesteps
    else:
        if timesteps is None or num_timesteps is None:
            raise ValueError("timesteps and num_timesteps are required when curve is an array.")
        ratio = np.asarray(curve, np.float64)
        total = int(num_timesteps)
        t_grid = _check_timesteps(timesteps, total)
        if ratio.shape != t_grid.shape:
            raise ValueError(
                f"curve and timesteps must have the same length, got {ratio.shape} and "
                f"{t_grid.shape}."
            )
    ratio = np.asarray(ratio, np.float64)
    if not np.isfinite(ratio).any():
        raise ValueError(
            "curve: no finite ratio W(t)/W(0); W(0) ≤ 0 means the two sets are not distinct."
        )
    below = np.flatnonzero(np.isfinite(ratio) & (ratio < delta))
    if below.size == 0:
        logging.warning(
            "The W2 curve never falls below delta=%g (min %.3g); t_delta = T = %d.",
            delta,
            np.nanmin(ratio),
            total,
        )
        return Located(total, 1.0, False, float(total - 1))
    k = int(below[0])
    if k == 0 or not np.isfinite(ratio[k - 1]):
        t_cross = float(t_grid[k])
    else:
        r0, r1 = ratio[k - 1], ratio[k]
        t0, t1 = float(t_grid[k - 1]), float(t_grid[k])
        t_cross = t0 + (r0 - delta) / (r0 - r1) * (t1 - t0)
    index = min(int(math.ceil(t_cross - 1e-9)), total - 1)
    t_delta = index + 1
    return Located(t_delta, t_delta / total, True, float(t_cross))


def t_delta_from_rate(
    decay_rate: float, delta: float, *, schedule: str, num_timesteps: int
) -> int | None:
    """Proposition 2 with a fitted K: the 1-based t_δ of the first t with K·s(t) ≥ −ln δ.

    Returns None when K is not positive or the bound is not reached by T.
    """
    delta = _check_delta("delta", delta)
    if not (math.isfinite(decay_rate) and decay_rate > 0):
        return None
    s = -np.log(np.cumprod(1.0 - schedules.betas64(schedule, num_timesteps)))
    hit = np.flatnonzero(decay_rate * s >= -math.log(delta))
    return int(hit[0]) + 1 if hit.size else None


# --------------------------------------------------------------------------------------------
# mode=locate: config → interval.json + interval.png


@dataclasses.dataclass(frozen=True)
class IntervalSpec:
    """The `interval` section of a config: what `run_locate` compares and how.

    Attributes:
      set_a: the first image set: 'class:<k>' (the images of class k of `config.data`),
        or 'all' (the data set).
      set_b: the second set: 'class:<k>', 'all', or 'perturbed' (set A's images with
        Gaussian pixel noise of std `perturb_std`, clipped to [−1, 1]; for data without
        labels).
      num_images: images per set, at most (a class with fewer uses all it has).
      num_t: grid points over [0, T−1], both ends included (`grid`).
      num_seeds: noise draws averaged.
      delta: Proposition 2's δ on the W₂ ratio W(t)/W(0), in (0, 1).
      epsilon_rel: ε_t = epsilon_rel × mean cost of (A_t, B_t).
      batch_size: None for dense cost matrices; rows per block of ott's online cost.
      estimator: 'debiased_baseline', 'naive' or 'sinkhorn_divergence'.
      max_iterations: Sinkhorn iterations per problem.
      threshold: Sinkhorn's L1 marginal-error tolerance.
      perturb_std: pixel noise std of set_b='perturbed' (images in [−1, 1]).
    """

    set_a: str = "class:0"
    set_b: str = "class:1"
    num_images: int = 500
    num_t: int = 50
    num_seeds: int = 3
    delta: float = 0.1
    epsilon_rel: float = 0.02
    batch_size: int | None = None
    estimator: str = "debiased_baseline"
    max_iterations: int = 1000
    threshold: float = 1e-3
    perturb_std: float = 0.2

    def __post_init__(self):
        _parse_set(self.set_a, "interval.set_a", allow_perturbed=False)
        _parse_set(self.set_b, "interval.set_b", allow_perturbed=True)
        for name, minimum in (("num_images", 1), ("num_t", 2), ("num_seeds", 1)):
            _check_int(f"interval.{name}", getattr(self, name), minimum)
        _check_int("interval.max_iterations", self.max_iterations, 1)
        if self.batch_size is not None:
            _check_int("interval.batch_size", self.batch_size, 1)
        _check_delta("interval.delta", self.delta)
        for name in ("epsilon_rel", "threshold", "perturb_std"):
            _check_positive(f"interval.{name}", getattr(self, name))
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"interval.estimator must be one of {ESTIMATORS}, got {self.estimator!r}."
            )
        if self.set_a == self.set_b:
            raise ValueError(
                f"interval.set_b: {self.set_b!r} names the same images as set_a; compare two "
                "different sets (e.g. set_a='class:0', set_b='class:1', or set_b='perturbed')."
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any | None) -> IntervalSpec:
        """Reads a ConfigDict (or mapping) section; missing fields take the defaults.

        Unknown fields are an error naming them.
        """
        if cfg is None:
            return cls()
        values = data_lib.config_section_values(cfg, cls, "interval")
        return cls(**values)


def _parse_set(name: Any, field: str, *, allow_perturbed: bool) -> tuple[str, int | None]:
    """'all' → ('all', None); 'class:k' → ('class', k); 'perturbed' → ('perturbed', None)."""
    valid = "'all', 'class:<k>' (k ≥ 0)" + (" or 'perturbed'" if allow_perturbed else "")
    if isinstance(name, str):
        if name == "all":
            return "all", None
        if name == "perturbed" and allow_perturbed:
            return "perturbed", None
        if name.startswith("class:") and name[6:].isdigit():
            return "class", int(name[6:])
    raise ValueError(f"{field}: unknown set {name!r}; valid: {valid}.")


def _load_sets(
    dspec: data_lib.DataSpec, ispec: IntervalSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The two image sets, [n, H, W, C] and [m, H, W, C] float32 in [−1, 1].

    Class sets take the first `num_images` images of the class in source order; the prefix
    of the source that is loaded doubles until every requested class is filled or the source
    is exhausted.
    """
    kind_a, class_a = _parse_set(ispec.set_a, "interval.set_a", allow_perturbed=False)
    kind_b, class_b = _parse_set(ispec.set_b, "interval.set_b", allow_perturbed=True)
    source = data_lib.open_source(dspec)
    total, num_classes = len(source), source.num_classes
    wanted = [c for c in (class_a, class_b) if c is not None]
    for field, c in (("set_a", class_a), ("set_b", class_b)):
        if c is not None and c >= num_classes:
            raise ValueError(
                f"interval.{field}: class {c} has no images: data {dspec.name!r} has "
                f"{num_classes} class(es), 0..{num_classes - 1}"
                + ("; use set_a='all', set_b='perturbed'." if num_classes == 1 else ".")
            )
    n = ispec.num_images
    prefix = min(total, n * (2 * max(len(wanted), 1) if wanted else 1))
    while True:
        images, labels = data_lib.load_all(dspec, prefix, with_labels=True)
        filled = all(int((labels == c).sum()) >= n for c in wanted)
        if filled or prefix >= total:
            break
        prefix = min(total, 2 * prefix)

    def pick(kind, c, field):
        if kind == "all":
            return images[:n]
        chosen = images[labels == c][:n]
        if chosen.shape[0] == 0:
            raise ValueError(
                f"interval.{field}: class {c} has no images in data {dspec.name!r} "
                f"(split {dspec.split!r})."
            )
        return chosen

    images_a = pick(kind_a, class_a, "set_a")
    if kind_b == "perturbed":
        key = jax.random.fold_in(jax.random.key(seed), _PERTURB_STREAM)
        noise = np.asarray(jax.random.normal(key, images_a.shape, jnp.float32))
        images_b = np.clip(images_a + ispec.perturb_std * noise, -1.0, 1.0)
    else:
        images_b = pick(kind_b, class_b, "set_b")
    return images_a, images_b


def run_locate(config: Any, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Locates t_δ on `config.data` (mode=locate) and writes interval.json and interval.png.

    Reads `config.interval` (see `IntervalSpec`; defaults when the section is absent),
    `config.data`, `config.diffusion.schedule`/`num_timesteps` and `config.seed`; computes
    `w2_curve` over `grid(T, num_t)` and `locate_t_delta` at `delta`; writes, atomically,
    `<workdir>/interval.json` (every per-t number, K, t_δ, its fraction and the settings)
    and `<workdir>/interval.png` (the normalised curve with its band, the naive curve, the
    fitted exponential e^{−K s(t)}, δ and t_δ).

    Args:
      config: an ml_collections config (see configs/default.py).
      workdir: output directory (created).
      progress: log the settings, a line per chunk of timesteps, and the result.

    Returns:
      The dict written to interval.json; 't_delta' is 1-based, 'fraction' = t_δ/T.
    """
    section = config.get("interval") if hasattr(config, "get") else None
    ispec = IntervalSpec.from_config(section)
    dspec = data_lib.DataSpec.from_config(config.data)
    schedule, total = config.diffusion.schedule, int(config.diffusion.num_timesteps)
    seed = int(config.seed)
    schedules.betas64(schedule, total)  # validate before loading anything
    images_a, images_b = _load_sets(dspec, ispec, seed)
    t_grid = grid(total, ispec.num_t)
    if progress:
        logging.info(
            "Locating t_δ: A = %s (%d images), B = %s (%d), images %s, %d timesteps × %d "
            "seeds, estimator %s, ε = %g × mean cost.",
            ispec.set_a,
            images_a.shape[0],
            ispec.set_b,
            images_b.shape[0],
            images_a.shape[1:],
            len(t_grid),
            ispec.num_seeds,
            ispec.estimator,
            ispec.epsilon_rel,
        )
    curve = w2_curve(
        images_a,
        images_b,
        schedule=schedule,
        num_timesteps=total,
        timesteps=t_grid,
        key=jax.random.fold_in(jax.random.key(seed), _INTERVAL_STREAM),
        num_seeds=ispec.num_seeds,
        estimator=ispec.estimator,
        epsilon_rel=ispec.epsilon_rel,
        batch_size=ispec.batch_size,
        max_iterations=ispec.max_iterations,
        threshold=ispec.threshold,
        progress=progress,
    )
    located = locate_t_delta(curve, ispec.delta)
    result = {
        "t_delta": located.t_delta,
        "fraction": located.fraction,
        "crossed": located.crossed,
        "t_cross": located.t_cross,
        "delta": float(ispec.delta),
        "estimator": ispec.estimator,
        "decay_rate": curve.decay_rate,
        "t_delta_from_rate": t_delta_from_rate(
            curve.decay_rate, ispec.delta, schedule=schedule, num_timesteps=total
        ),
        "schedule": schedule,
        "num_timesteps": total,
        "seed": seed,
        "data": {
            "name": dspec.name,
            "image_shape": list(images_a.shape[1:]),
            "set_a": ispec.set_a,
            "set_b": ispec.set_b,
            "num_a": int(images_a.shape[0]),
            "num_b": int(images_b.shape[0]),
        },
        "interval": dataclasses.asdict(ispec),
        "curve": curve.to_json(),
    }
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        artifacts.write_json(result, os.path.join(workdir, "interval.json"))
        _plot(curve, located, ispec.delta, os.path.join(workdir, "interval.png"))
    if progress:
        logging.info(
            "t_δ = %d (t_δ/T = %.3f) where W₂(t)/W₂(0) < δ = %g; fitted K = %.3f; %.1f s.",
            located.t_delta,
            located.fraction,
            ispec.delta,
            curve.decay_rate,
            curve.seconds,
        )
    return result


def load_t_delta(workdir: str) -> int | None:
    """The 1-based t_δ stored in `<workdir>/interval.json` by `run_locate`, or None if absent.

    Raises:
      ValueError: the file exists but is not a `run_locate` result.
    """
    path = os.path.join(workdir, "interval.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            t_delta = json.load(f)["t_delta"]
        if isinstance(t_delta, bool) or not isinstance(t_delta, int) or t_delta < 1:
            raise TypeError(f"t_delta = {t_delta!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a readable interval.json from mode=locate ({e}); delete it to "
            "locate t_δ again."
        ) from e
    return t_delta


def _plot(curve: W2Curve, located: Located, delta: float, path: str) -> None:
    """Two panels (linear and log y) of W(t)/W(0) against the 0-based t."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    t = curve.timesteps
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    floor = 1e-3  # lower limit of the log panel
    for ax, log in zip(fig.subplots(1, 2), (False, True), strict=True):
        clip = functools.partial(np.maximum, floor) if log else np.asarray
        ax.plot(t, clip(curve.ratio), color="tab:blue", label=f"{curve.estimator} (mean)")
        ax.fill_between(
            t,
            clip(curve.ratio_band[0]),
            clip(curve.ratio_band[1]),
            color="tab:blue",
            alpha=0.25,
            label=f"±1 std over {curve.num_seeds} seed(s)",
        )
        if curve.estimator != "naive":
            ax.plot(t, clip(curve.naive_ratio), color="tab:red", ls="--", label="naive Eq. 8")
        if math.isfinite(curve.decay_rate):
            ax.plot(
                t,
                clip(np.exp(-curve.decay_rate * curve.s)),
                color="k",
                ls=":",
                label=f"fit e^(−K s(t)), K = {curve.decay_rate:.3f}",
            )
        ax.axhline(delta, color="tab:green", lw=1, label=f"δ = {delta:g}")
        ax.axvline(
            located.t_delta - 1,
            color="tab:purple",
            lw=1,
            label=f"t_δ = {located.t_delta} (t_δ/T = {located.fraction:.3f})",
        )
        ax.set_xlabel("timestep t (0-based)")
        ax.set_ylabel("W₂(t) / W₂(0)")
        ax.set_xlim(0, curve.num_timesteps - 1)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(floor, None)
        else:
            ax.set_ylim(0, None)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"W₂ between forward-diffused sets ({curve.schedule}, T = {curve.num_timesteps}, "
        f"n = {curve.num_a}/{curve.num_b}, d = {curve.dim})",
        fontsize=10,
    )
    artifacts.save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------
# Solving one seed


def _solve_seed(
    a: jax.Array,
    b: jax.Array,
    noise: Mapping[str, jax.Array],
    t_grid: np.ndarray,
    *,
    seed: int,
    num_seeds: int,
    pair_names: tuple[str, ...],
    schedule_obj: schedules.Schedule,
    epsilon_rel: float,
    batch_size: int | None,
    solver_options: tuple[float, int, int],
    chunk_size: int,
    progress: bool,
) -> dict[str, Any]:
    """All pairs at every grid t for one seed; numpy results [K] per pair."""
    sets = {"a": a, "b": b}
    num_chunks = -(-len(t_grid) // chunk_size)
    padded = np.concatenate(
        [t_grid, np.full(num_chunks * chunk_size - len(t_grid), t_grid[-1], t_grid.dtype)]
    ).astype(np.int32)
    if batch_size is None:
        terms = _dense_terms(sets, noise, pair_names)
        run_chunk = functools.partial(_dense_chunk, terms)
    else:
        points = {
            p: (sets[PAIRS[p][0]], sets[PAIRS[p][1]], noise[PAIRS[p][2]], noise[PAIRS[p][3]])
            for p in pair_names
        }
        run_chunk = functools.partial(_online_chunk, points, batch_size=batch_size)
    sizes = {"a": a.shape[0], "b": b.shape[0]}
    carry = {
        p: (
            jnp.zeros((sizes[PAIRS[p][0]],), jnp.float32),
            jnp.zeros((sizes[PAIRS[p][1]],), jnp.float32),
        )
        for p in pair_names
    }
    outputs = []
    start = time.perf_counter()
    for c in range(num_chunks):
        t_chunk = jnp.asarray(padded[c * chunk_size : (c + 1) * chunk_size])
        carry, out = run_chunk(
            carry,
            t_chunk,
            schedule_obj,
            jnp.float32(epsilon_rel),
            pair_names=pair_names,
            solver_options=solver_options,
        )
        outputs.append(jax.device_get(out))
        if progress:
            done = min((c + 1) * chunk_size, len(t_grid))
            logging.info(
                "W2 curve: seed %d/%d, %d/%d timesteps (t ≤ %d) in %.1f s.",
                seed + 1,
                num_seeds,
                done,
                len(t_grid),
                int(t_grid[done - 1]),
                time.perf_counter() - start,
            )
    k = len(t_grid)
    merged = jax.tree.map(lambda *xs: np.concatenate(xs)[:k], *outputs)
    return {
        "epsilon": merged["epsilon"],
        "transport": {p: merged[p]["transport"] for p in pair_names},
        "regularized": {p: merged[p]["regularized"] for p in pair_names},
        "converged": {p: merged[p]["converged"] for p in pair_names},
        "iterations": {p: merged[p]["iterations"] for p in pair_names},
    }


def _solvers(solver_options: tuple[float, int, int]) -> tuple[sinkhorn.Sinkhorn, sinkhorn.Sinkhorn]:
    """(general solver, solver for symmetric self-pairs) as ott's sinkhorn_divergence sets them."""
    threshold, max_iterations, inner_iterations = solver_options
    common = dict(
        threshold=threshold,
        max_iterations=max_iterations,
        inner_iterations=min(inner_iterations, max_iterations),
    )
    general = sinkhorn.Sinkhorn(**common)
    symmetric = sinkhorn.Sinkhorn(
        parallel_dual_updates=True, momentum=acceleration.Momentum(start=0, value=0.5), **common
    )
    return general, symmetric


def _sqnorm(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x), axis=1)


def _gram(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y.T, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames="pair_names")
def _dense_terms(sets, noise, pair_names):
    """Per pair, the three t-independent [n, m] matrices that give C_t (module docstring).

    D = ‖x_i − y_j‖², N = ‖ξ_i − η_j‖², X = ⟨x_i − y_j, ξ_i − η_j⟩, each float32.
    """
    terms = {}
    data_d = {}
    for p in pair_names:
        xs, ys, xn, yn = PAIRS[p]
        x, y, xi, eta = sets[xs], sets[ys], noise[xn], noise[yn]
        if (xs, ys) not in data_d:
            data_d[(xs, ys)] = jnp.maximum(
                _sqnorm(x)[:, None] + _sqnorm(y)[None, :] - 2.0 * _gram(x, y), 0.0
            )
        dn = jnp.maximum(_sqnorm(xi)[:, None] + _sqnorm(eta)[None, :] - 2.0 * _gram(xi, eta), 0.0)
        cross = (
            jnp.sum(x * xi, axis=1)[:, None]
            - _gram(x, eta)
            - _gram(xi, y)
            + jnp.sum(y * eta, axis=1)[None, :]
        )
        terms[p] = (data_d[(xs, ys)], dn, cross)
    return terms


def _dense_cost(terms, alpha_bar):
    d, n, x = terms
    a2 = alpha_bar
    return jnp.maximum(a2 * d + (1.0 - a2) * n + 2.0 * jnp.sqrt(a2 * (1.0 - a2)) * x, 0.0)


@functools.partial(jax.jit, static_argnames=("pair_names", "solver_options"))
def _dense_chunk(terms, carry, t_chunk, schedule_obj, epsilon_rel, *, pair_names, solver_options):
    """`lax.scan` over a chunk of timesteps, warm-starting every pair from the previous t."""
    general, symmetric = _solvers(solver_options)

    def step(potentials, t):
        alpha_bar = schedule_obj.alphas_cumprod[t]
        costs = {p: _dense_cost(terms[p], alpha_bar) for p in pair_names}
        mean_cost = jnp.mean(costs["ab"])
        new_potentials, out = {}, {"epsilon": epsilon_rel * mean_cost}
        for p in pair_names:
            geom = ott_geometry.Geometry(cost_matrix=costs[p] / mean_cost, epsilon=epsilon_rel)
            solver = symmetric if p in _SYMMETRIC else general
            with jax.numpy_rank_promotion("allow"):  # ott broadcasts implicitly
                res = solver(linear_problem.LinearProblem(geom), init=potentials[p])
            new_potentials[p] = (res.f, res.g)
            out[p] = {
                "transport": jnp.sum(res.matrix * costs[p]),
                "regularized": res.reg_ot_cost * mean_cost,
                "converged": res.converged,
                "iterations": res.n_iters,
            }
        return new_potentials, out

    return jax.lax.scan(step, carry, t_chunk)


@functools.partial(jax.jit, static_argnames=("pair_names", "solver_options", "batch_size"))
def _online_chunk(
    points, carry, t_chunk, schedule_obj, epsilon_rel, *, pair_names, solver_options, batch_size
):
    """As `_dense_chunk`, with the noised sets from `q_sample` and ott's online point clouds."""
    general, symmetric = _solvers(solver_options)

    def noised(x, xi, t):
        return diffusion.q_sample(schedule_obj, x, jnp.full((x.shape[0],), t), xi)

    def step(potentials, t):
        clouds = {}
        for p in pair_names:
            x, y, xi, eta = points[p]
            clouds[p] = (noised(x, xi, t), noised(y, eta, t))
        xa, xb = clouds["ab"]
        # mean_ij ‖x_i − y_j‖² = mean ‖x‖² + mean ‖y‖² − 2 x̄·ȳ, without the [n, m] matrix.
        mean_cost = (
            jnp.mean(_sqnorm(xa))
            + jnp.mean(_sqnorm(xb))
            - 2.0 * jnp.dot(jnp.mean(xa, 0), jnp.mean(xb, 0), precision=_HIGHEST)
        )
        scale = jax.lax.rsqrt(mean_cost)
        new_potentials, out = {}, {"epsilon": epsilon_rel * mean_cost}
        for p in pair_names:
            x, y = clouds[p][0] * scale, clouds[p][1] * scale
            geom = _BlockedPointCloud(x, y, batch_size=batch_size, epsilon=epsilon_rel)
            solver = symmetric if p in _SYMMETRIC else general
            with jax.numpy_rank_promotion("allow"):  # ott broadcasts implicitly
                res = solver(linear_problem.LinearProblem(geom), init=potentials[p])
            new_potentials[p] = (res.f, res.g)
            out[p] = {
                "transport": _blocked_transport_cost(x, y, res.f, res.g, epsilon_rel, batch_size)
                * mean_cost,
                "regularized": res.reg_ot_cost * mean_cost,
                "converged": res.converged,
                "iterations": res.n_iters,
            }
        return new_potentials, out

    return jax.lax.scan(step, carry, t_chunk)


@jax.tree_util.register_pytree_node_class
class _BlockedPointCloud(pointcloud.PointCloud):
    """ott's online squared-Euclidean `PointCloud`, with its blocks mapped by `lax.map`.

    ott-jax 0.6.0's online mode calls `jax.interpreters.batching.is_vmappable`, which JAX 0.9
    removed (ott-jax/ott#700, fixed on ott's main after 0.6.0), so any `batch_size` fails.
    Sinkhorn in log-sum-exp mode only needs `apply_lse_kernel` without `vec` (potential
    updates, marginals, the regularised cost); this computes it `batch_size` output points at
    a time, never holding more than a [batch_size, n] block of the cost.
    """

    def apply_lse_kernel(self, f, g, eps, vec=None, axis=0):
        if vec is not None:
            raise NotImplementedError("_BlockedPointCloud.apply_lse_kernel supports vec=None.")
        # axis=0: one output per column j, ε·log Σ_i exp((f_i − C_ij)/ε); axis=1: per row i.
        # (ott adds and removes the output's own potential for stability; logsumexp already
        # subtracts the maximum, and the two cancel exactly.)
        if axis == 0:
            out = _blocked_lse(self.y, self.x, f, eps, self.batch_size)
        else:
            out = _blocked_lse(self.x, self.y, g, eps, self.batch_size)
        return out, jnp.ones_like(out)


def _blocked_lse(q, p, h, eps, batch_size):
    """out_k = ε·logsumexp_l((h_l − ‖q_k − p_l‖²)/ε) for every row q_k, `batch_size` at a time."""
    num = q.shape[0]
    rows = min(batch_size, num)
    pad = -num % rows
    blocks = jnp.pad(q, ((0, pad), (0, 0))).reshape(-1, rows, q.shape[1])
    p_sq = _sqnorm(p)

    def block(qb):
        c = jnp.maximum(_sqnorm(qb)[:, None] + p_sq[None, :] - 2.0 * _gram(qb, p), 0.0)
        return eps * jax.nn.logsumexp((h[None, :] - c) / eps, axis=1)

    return jax.lax.map(block, blocks).reshape(-1)[:num]


def _blocked_transport_cost(x, y, f, g, eps, batch_size):
    """⟨P, C⟩ with P_ij = exp((f_i + g_j − C_ij)/ε), C_ij = ‖x_i − y_j‖², `batch_size` rows at
    a time (ott materialises P and C for this when d is large)."""
    n = x.shape[0]
    rows = min(batch_size, n)
    pad = -n % rows
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    fp = jnp.pad(f, (0, pad), constant_values=-jnp.inf)
    y_sq = _sqnorm(y)

    def block(args):
        xb, fb = args
        c = jnp.maximum(_sqnorm(xb)[:, None] + y_sq[None, :] - 2.0 * _gram(xb, y), 0.0)
        p = jnp.exp((fb[:, None] + g[None, :] - c) / eps)
        return jnp.sum(p * c)

    blocks = jax.lax.map(block, (xp.reshape(-1, rows, x.shape[1]), fp.reshape(-1, rows)))
    return jnp.sum(blocks)


# --------------------------------------------------------------------------------------------
# Validation helpers


def _as_flat(images: Any, name: str) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim < 2:
        raise ValueError(f"{name} must be [n, H, W, C] or [n, d], got shape {array.shape}.")
    if array.shape[0] == 0 or array[0].size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); it needs at least one image.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values.")
    return array.reshape(array.shape[0], -1)


def _check_timesteps(timesteps: Any, num_timesteps: int) -> np.ndarray:
    t = np.asarray(timesteps)
    if t.ndim != 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(
            f"timesteps must be a non-empty 1-D integer array, got {t.dtype} shape {t.shape}."
        )
    if t.min() < 0 or t.max() >= num_timesteps or np.any(np.diff(t) <= 0):
        raise ValueError(
            f"timesteps must be increasing 0-based indices in [0, {num_timesteps}), got "
            f"{t.tolist() if t.size <= 8 else t}."
        )
    return t.astype(np.int64)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")


def _check_delta(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not (ok and 0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}.")
    return float(value)
