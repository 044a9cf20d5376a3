"""Measurements of ODE trajectories (numpy float64 on the host): the paper's findings as numbers.

For a `trajectories.Trajectory` (Chen et al., "A Geometric Perspective on Diffusion Models",
arXiv:2305.19947): the sampling trajectory is quasi-linear, staying close to the chord between
its end points (`quasi_linearity`); the denoising trajectory reaches the final sample much
earlier (`convergence`, `denoiser_settles_at`); and the turn of the sampling trajectory at each
step is exactly the turn of x − D̄, i.e. it is caused by the change of the denoising output
between steps (`curvature`). `nearest_data_distance` shows that the optimal denoiser can only
reproduce training points.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import schedules
from ddpm_bs.geometry import trajectories


def flatten(a: Any, lead: int) -> np.ndarray:
    """float64 `a` with its axes after the first `lead` flattened into one."""
    a = np.asarray(a, np.float64)
    return a.reshape(a.shape[:lead] + (-1,))


def quasi_linearity(samples: Any) -> dict[str, np.ndarray]:
    """Deviation of each sampling trajectory from the chord between its end points (the paper).

    Args:
      samples: [N+1, B, ...] a sampling trajectory per batch entry.

    Returns (float64 arrays):
      deviation: [N+1, B] distance of x_i to the straight line through x_0 and x_N.
      relative_deviation: [N+1, B] deviation / chord length.
      max_relative_deviation, mean_relative_deviation: [B] over the steps.
      chord_length: [B] ‖x_N − x_0‖.
      deviation_over_remaining: [N, B] deviation / ‖x_i − x_N‖ for i < N: the bend relative
        to the distance still to go (the chord normalisation is dominated by the long,
        straight large-σ part).
      pca_explained_variance: [B, k] (k = min(3, N+1)) share of the variance of the points
        {x_i} along their top principal directions (1 = a straight line).
    """
    x = flatten(samples, 2)  # [N+1, B, d]
    chord = x[-1] - x[0]  # [B, d]
    length = np.linalg.norm(chord, axis=-1)  # [B]
    unit = chord / np.maximum(length, 1e-30)[:, None]
    v = x - x[0][None]
    along = np.einsum("nbd,bd->nb", v, unit)
    deviation = np.linalg.norm(v - along[..., None] * unit[None], axis=-1)
    rel = deviation / np.maximum(length, 1e-30)[None]
    remaining = np.linalg.norm(x[:-1] - x[-1][None], axis=-1)
    centred = x - x.mean(axis=0, keepdims=True)
    svals = np.stack([np.linalg.svd(centred[:, b], compute_uv=False) for b in range(x.shape[1])])
    var = np.square(svals)
    k = min(3, x.shape[0])
    explained = var[:, :k] / np.maximum(var.sum(axis=1, keepdims=True), 1e-300)
    return {
        "deviation": deviation,
        "relative_deviation": rel,
        "max_relative_deviation": rel.max(axis=0),
        "mean_relative_deviation": rel.mean(axis=0),
        "chord_length": length,
        "deviation_over_remaining": deviation[:-1] / np.maximum(remaining, 1e-30),
        "pca_explained_variance": explained,
    }


def convergence(traj: trajectories.Trajectory) -> dict[str, np.ndarray]:
    """Distances of the sampling and denoising trajectories to the final sample (the paper).

    Returns (float64 arrays):
      sample_to_final: [N+1, B] ‖x_i − x_N‖.
      denoised_to_final: [N, B] ‖D(x_i; σ_i) − x_N‖.
      ratio: [N] mean over B of denoised_to_final / sample_to_final (< 1: the denoising
        trajectory is closer to where the sampler ends).
    """
    x = flatten(traj.samples, 2)
    d = flatten(traj.denoised, 2)
    final = x[-1][None]
    sample_dist = np.linalg.norm(x - final, axis=-1)
    denoised_dist = np.linalg.norm(d - final, axis=-1)
    ratio = np.mean(denoised_dist / np.maximum(sample_dist[:-1], 1e-30), axis=1)
    return {"sample_to_final": sample_dist, "denoised_to_final": denoised_dist, "ratio": ratio}


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between the vectors a and b along the last axis."""
    dot = np.sum(a * b, axis=-1)
    cross = np.sqrt(np.maximum(np.sum(a * a, -1) * np.sum(b * b, -1) - dot**2, 0.0))
    return np.degrees(np.arctan2(cross, dot))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def curvature(traj: trajectories.Trajectory, method: str) -> dict[str, Any]:
    """How the denoising trajectory steers the sampling trajectory (the paper).

    Step i moves x along x_i − D̄_i (`trajectories.effective_denoised`), and x_{i+1} − D̄_{i+1} =
    (σ_{i+1}/σ_i)(x_i − D̄_i) + (D̄_i − D̄_{i+1}): the trajectory turns at x_{i+1} exactly by the
    angle that the change of the (effective) denoising output adds. Measured at the interior
    points i = 1..N−1:

    Returns:
      turn_angle_deg: [N−1, B] angle between x_i − x_{i−1} and x_{i+1} − x_i.
      denoised_change: [N−1, B] ‖D_i − D_{i−1}‖.
      relative_denoised_change: [N−1, B] ‖D_i − D_{i−1}‖ / ‖x_i − D_i‖.
      pearson, spearman: correlation of turn_angle_deg with relative_denoised_change over all
        points (floats).
      identity_max_error_deg: max |turn − angle(x_{i−1} − D̄_{i−1}, x_i − D̄_i)| (float ~0).
      raw_denoised_max_error_deg: the same with the raw D_i in place of D̄_i (exact for Euler).
      mean_turn_angle_deg: [N−1] mean over B.
    """
    x = flatten(traj.samples, 2)
    d = flatten(traj.denoised, 2)
    d_bar = flatten(trajectories.effective_denoised(traj, method), 2)
    step = x[1:] - x[:-1]  # [N, B, d]
    turn = _angle(step[:-1], step[1:])  # [N−1, B] at x_1..x_{N−1}
    change = np.linalg.norm(d[1:] - d[:-1], axis=-1)
    rel_change = change / np.maximum(np.linalg.norm(x[1:-1] - d[1:], axis=-1), 1e-30)
    predicted = _angle(x[:-2] - d_bar[:-1], x[1:-1] - d_bar[1:])
    predicted_raw = _angle(x[:-2] - d[:-1], x[1:-1] - d[1:])
    if turn.size >= 2:
        pearson = float(np.corrcoef(turn.ravel(), rel_change.ravel())[0, 1])
        spearman = _spearman(turn.ravel(), rel_change.ravel())
    else:
        pearson = spearman = float("nan")
    return {
        "turn_angle_deg": turn,
        "denoised_change": change,
        "relative_denoised_change": rel_change,
        "pearson": pearson,
        "spearman": spearman,
        "identity_max_error_deg": float(np.max(np.abs(turn - predicted), initial=0.0)),
        "raw_denoised_max_error_deg": float(np.max(np.abs(turn - predicted_raw), initial=0.0)),
        "mean_turn_angle_deg": turn.mean(axis=1),
    }


def nearest_data_distance(points: Any, data: Any) -> np.ndarray:
    """‖p − nearest data point‖ for each of points [B, ...]; data [N, ...]. float64 [B]."""
    p = flatten(points, 1)
    y = flatten(data, 1)
    dist = np.sum(p * p, 1)[:, None] - 2.0 * p @ y.T + np.sum(y * y, 1)[None, :]
    return np.sqrt(np.maximum(dist.min(axis=1), 0.0))


def data_nn_distance(images: np.ndarray, max_points: int) -> np.ndarray:
    """Distance of each of the first `max_points` data points to its nearest other point."""
    y = flatten(images[:max_points], 1)
    dist = np.sum(y * y, 1)[:, None] - 2.0 * y @ y.T + np.sum(y * y, 1)[None, :]
    np.fill_diagonal(dist, np.inf)
    return np.sqrt(np.maximum(dist.min(axis=1), 0.0))


def denoiser_settles_at(
    traj: trajectories.Trajectory,
    threshold: float = 0.01,
    schedule: schedules.Schedule | None = None,
) -> dict[str, Any]:
    """Where the denoising trajectory stops changing: the largest σ below which it stays put.

    r(σ_i) = mean_b ‖D(x_i; σ_i) − x_N‖ / mean_b ‖D(x_0; σ_0) − x_N‖ (x_N the final sample,
    which equals the last D for a final Euler step to 0). Returns the largest σ_i such that
    r ≤ threshold at σ_i and at every smaller σ of the ladder; with `schedule`, also its
    nearest timestep t (`schedules.sigma_to_timestep`) and t/T.
    """
    conv = convergence(jax.device_get(traj))
    dist = conv["denoised_to_final"].mean(axis=1)  # [N]
    ratio = dist / max(dist[0], 1e-30)
    sig = np.asarray(traj.sigmas, np.float64)[:-1]
    above = np.nonzero(ratio > threshold)[0]
    first = int(above[-1]) + 1 if above.size else 0
    out: dict[str, Any] = {"threshold": float(threshold)}
    if first >= ratio.size:  # never settles before the last step
        out.update(sigma=None, t=None, t_over_T=None)
        return out
    out["sigma"] = float(sig[first])
    out["ratio_at_sigma"] = float(ratio[first])
    if schedule is not None:
        t = int(schedules.sigma_to_timestep(schedule, jnp.float32(sig[first])))
        out["t"] = t
        out["t_over_T"] = t / schedule.num_timesteps
    return out
