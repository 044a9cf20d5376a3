"""Reading t_δ off a W₂ curve: Theorem 1's decay rate and Proposition 2's crossing point.

Theorem 1 bounds the W₂ distance of two forward-diffused distributions, W₂(μ_t, μ̂_t) ≤
e^{−K t}·W₂(μ_0, μ̂_0) (Eq. 6); `fit_decay_rate` fits log W(t)/W(0) ≈ −K·s(t) with s(t) =
−log ᾱ_t, the integrated β of the VP SDE. Proposition 2 (Eq. 7) calls the timesteps where W₂
has fallen below δ·W₂(μ_0, μ̂_0) insignificant: `locate_t_delta` returns the first grid
crossing of the measured curve, `t_delta_from_rate` the one of the fitted bound, both as the
paper's 1-based t_δ that `config.timesteps.t_delta` takes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from absl import logging

from ddpm_bs import schedules
from ddpm_bs.interval import _checks

if TYPE_CHECKING:
    from ddpm_bs.interval import curve as curve_lib


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
    curve: curve_lib.W2Curve | np.ndarray,
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
    delta = _checks.check_delta("delta", delta)
    if hasattr(curve, "ratio"):  # a W2Curve
        ratio, t_grid, total = curve.ratio, curve.timesteps, curve.num_timesteps
    else:
        if timesteps is None or num_timesteps is None:
            raise ValueError("timesteps and num_timesteps are required when curve is an array.")
        ratio = np.asarray(curve, np.float64)
        total = int(num_timesteps)
        t_grid = _checks.check_timesteps(timesteps, total)
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
    delta = _checks.check_delta("delta", delta)
    if not (math.isfinite(decay_rate) and decay_rate > 0):
        return None
    s = -np.log(np.cumprod(1.0 - schedules.betas64(schedule, num_timesteps)))
    hit = np.flatnonzero(decay_rate * s >= -math.log(delta))
    return int(hit[0]) + 1 if hit.size else None
