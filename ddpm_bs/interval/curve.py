"""The W₂ curve t ↦ W₂(μ_t, μ̂_t) of two image sets under forward diffusion (the paper's Eq. 8).

For two image sets A and B, each noised as `diffusion.q_sample` does, `w2_curve` estimates W₂²
with entropic optimal transport (ott-jax's Sinkhorn, squared Euclidean cost; `sinkhorn`
solves the problems) and normalises the curve by its first point.

Estimators (all estimate W₂² and are in squared pixel units):

* ``'naive'``: the transport cost ⟨P_ε, C⟩ between A_t and B_t noised independently, Eq. 8 as
  written. It *rises* with t: in high dimension two finite noisy sets are far apart because
  of the noise alone (their cost grows like 2d(1−ᾱ_t)), which swamps the data term. Measured
  with ott-jax on two synthetic sets (n = 500 each, d = 3,072, linear schedule, ε = 2% of the
  mean cost), it went 1,390 → 1,529 → 1,877 → 2,989 → 6,046 at t = 0, 50, 100, 200, 999. It is
  always reported, so the reason for the others is visible.
* ``'debiased_baseline'`` (the default): OT(A_t, B_t) − ½[OT(A_t, A′_t) + OT(B_t, B′_t)],
  transport costs, with A′_t, B′_t the same images noised again independently. The baseline
  terms hold the noise-to-noise cost of a pair with *equal* distributions, so the difference
  keeps the data term only; it decays as Theorem 1 predicts and reaches ≈ 0: on the same
  sets, 1,390 → 1,344 → 1,232 → 772 → 398 → 36 → ≈ 0 at t = 0, 50, 100, 200, 300, 400, 600,
  below the √ᾱ_t-scaled bound.
* ``'sinkhorn_divergence'``: S_ε(A_t, B_t) = OT_ε(A_t, B_t) − ½[OT_ε(A_t, A_t) + OT_ε(B_t, B_t)]
  with regularised costs (Feydy et al. 2019; ott's `sinkhorn_divergence`). It removes the
  entropic bias, but its self terms compare a noisy set with itself (the same noise), so they
  do not contain the noise-to-noise cost of independently noised sets: it rises like the naive
  curve (1,222 → 5,332 from t = 0 to 999 on the same sets).

The curve W(t) = √max(estimate, 0) is the W₂ estimate; the normalised curve W(t)/W(t₀) (t₀
the first grid point, normally 0) is averaged over noise seeds, and `fit.fit_decay_rate` fits
Eq. 6 to it.

Each seed draws one noise per image (ξ_A, ξ_B, and ξ_A′, ξ_B′ for the baseline) and keeps it
for every t (common random numbers): x_t = √ᾱ_t x + √(1−ᾱ_t) ξ as `diffusion.q_sample`. The
curve is then smooth in t, and consecutive Sinkhorn problems are close, so each t is
warm-started from the previous t's potentials (see `sinkhorn` for the dense and online costs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_bs import progress as progress_lib
from ddpm_bs import schedules
from ddpm_bs.interval import _checks, fit
from ddpm_bs.interval import sinkhorn as sinkhorn_lib

ESTIMATORS = ("debiased_baseline", "naive", "sinkhorn_divergence")
_ESTIMATOR_PAIRS = {  # the pairs of `sinkhorn.PAIRS` each estimator needs
    "naive": ("ab",),
    "debiased_baseline": ("ab", "aa_prime", "bb_prime"),
    "sinkhorn_divergence": ("ab", "aa", "bb"),
}
_NOISES = ("a", "b", "a2", "b2")


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
      transport: pair name → [S, K] transport cost ⟨P_ε, C⟩ (pairs: see `sinkhorn.PAIRS`).
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
    from the previous t. See the module docstring for the estimators, `sinkhorn` for the speed-ups.

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
      chunk_size: timesteps per compiled `lax.scan`; progress is counted after each chunk.
      progress: report the timesteps solved, their rate and the time left
        (`progress.Progress`, on process 0).

    Returns:
      A `W2Curve`.

    Raises:
      ValueError: on empty or mismatched sets, a bad grid, or an unknown estimator, naming
        the argument.
    """
    start = time.perf_counter()
    a, b = _checks.as_flat(images_a, "images_a"), _checks.as_flat(images_b, "images_b")
    if a.shape[1] != b.shape[1] or np.shape(images_a)[1:] != np.shape(images_b)[1:]:
        raise ValueError(
            f"images_a and images_b must have the same image shape, got "
            f"{tuple(np.shape(images_a)[1:])} and {tuple(np.shape(images_b)[1:])}."
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    betas = schedules.betas64(schedule, num_timesteps)  # validates schedule and T
    t_grid = _checks.check_timesteps(timesteps, num_timesteps)
    _checks.check_int("num_seeds", num_seeds, 1)
    _checks.check_int("max_iterations", max_iterations, 1)
    _checks.check_int("inner_iterations", inner_iterations, 1)
    _checks.check_int("chunk_size", chunk_size, 1)
    if batch_size is not None:
        _checks.check_int("batch_size", batch_size, 1)
    _checks.check_positive("epsilon_rel", epsilon_rel)
    _checks.check_positive("threshold", threshold)

    ac64 = np.cumprod(1.0 - betas)[t_grid]  # ᾱ_t at the grid, float64
    pair_names = _pairs_for(estimator, all_estimators)
    a_dev, b_dev = jnp.asarray(a), jnp.asarray(b)
    per_seed = []
    schedule_obj = schedules.schedule_from_betas(betas, schedule)
    bar = progress_lib.Progress(
        "W2 curve", total=num_seeds * len(t_grid), unit="t", enabled=None if progress else False
    )
    with bar:
        for seed in range(num_seeds):
            per_seed.append(
                sinkhorn_lib.solve_seed(
                    a_dev,
                    b_dev,
                    seed_noise(key, seed, a.shape[0], b.shape[0], a.shape[1]),
                    t_grid,
                    pair_names=pair_names,
                    schedule_obj=schedule_obj,
                    epsilon_rel=float(epsilon_rel),
                    batch_size=batch_size,
                    solver_options=(float(threshold), int(max_iterations), int(inner_iterations)),
                    chunk_size=int(chunk_size),
                    on_chunk=bar.update,
                )
            )
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
        decay_rate=fit.fit_decay_rate(s, ratio),
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
    return tuple(p for p in sinkhorn_lib.PAIRS if any(p in ps for ps in _ESTIMATOR_PAIRS.values()))


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
