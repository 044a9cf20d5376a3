"""The geometry of the VE probability-flow ODE: optimal denoiser, mean shift, trajectories.

Reproduces the analysis of Chen et al., "A Geometric Perspective on Diffusion Models"
(arXiv:2305.19947; "the paper" below) for the empirical data distribution and for a trained
VP model read as a VE denoiser. References to the paper name its findings rather than section
numbers, which differ between its versions.

Notation. A VE state at noise level σ is x = y + σ·n with y a data point and n ~ N(0, I).
The PF-ODE in EDM's form (Karras et al. 2022, Eq. 1 with σ(t) = t and ∇log p = (D − x)/σ²) is

    dx/dσ = (x − D(x; σ)) / σ,                                                        (1)

with D(x; σ) = E[y | x] the (optimal) denoiser. Integrating it from σ_max down to 0 gives the
*sampling trajectory* {x_σ}; the denoiser outputs along it form the *denoising trajectory*
{D(x_σ; σ)} (the paper's two trajectories).

Facts this module implements and measures:

* For data uniform on a finite set {y_k}, D is a softmax-weighted average of the y_k with
  logits −‖x − y_k‖²/(2σ²): one Gaussian-kernel mean-shift iteration with bandwidth σ
  (the paper: "optimal ODE-based sampling and mean shift"). An Euler step of (1) from σ to σ' is
  x' = (σ'/σ)·x + (1 − σ'/σ)·D(x; σ), a convex combination of x and its mean shift; to σ' = 0
  it lands on D(x; σ) exactly.
* In the coordinates z = x/σ, τ = 1/σ, Eq. (1) reads dz/dτ = D(σ·z; σ): the denoiser *is* the
  velocity. Every solver below (Heun, DPM-Solver-2, DPM-Solver++(2M)) takes, at each step, an
  Euler step with an effective denoiser D̄ built
  from finite differences of the denoising trajectory (the paper: "finite differences of the
  denoising trajectory yield second-order samplers"), see `effective_denoised`.
* The sampling trajectory is quasi-linear (it stays close to the chord between its end
  points), the denoising trajectory reaches the final sample much earlier, and the turn of
  the sampling trajectory at each step is exactly the turn of x − D̄, i.e. it is caused by the
  change of the denoising output between steps (the paper's observations on both trajectories).

All arrays keep a leading batch axis: `x: [B, ...]`; `data: [N, ...]` with the same trailing
shape; `sigma`: a scalar or [B].
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import artifacts, diffusion, schedules
from ddpm_bs import data as data_lib

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], sigma [B]) -> D [B, ...]

SOLVERS = ("euler", "heun", "dpm2", "dpmpp_2m")
DEFAULT_CHUNK = 1024
_HIGHEST = jax.lax.Precision.HIGHEST  # keep the ‖x‖² − 2x·y + ‖y‖² expansion out of TF32
_GEOMETRY_STREAM = 0x6E0  # fold_in constant: the geometry noise is its own stream of config.seed


# --------------------------------------------------------------------------------------------
# The optimal denoiser = Gaussian mean shift


def _is_tracer(a: Any) -> bool:
    return isinstance(a, jax.core.Tracer)


def _check_sigma(sigma: Any, batch: int) -> jax.Array:
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != batch):
        raise ValueError(
            f"sigma must be a scalar or have shape [B] = [{batch}], got shape {sigma.shape}."
        )
    if not _is_tracer(sigma) and not np.all(np.asarray(sigma) > 0):
        raise ValueError(
            f"sigma must be > 0 (use the data itself at σ = 0), got min {np.min(np.asarray(sigma))}."
        )
    return jnp.broadcast_to(sigma, (batch,))


def optimal_denoiser(
    x: jax.Array,
    sigma: jax.Array | float,
    data: jax.Array,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> jax.Array:
    """The posterior mean E[y | x] for y ~ uniform(data) and x = y + σ·n, n ~ N(0, I).

    D(x; σ) = Σ_k w_k y_k with w = softmax_k(−‖x − y_k‖² / (2σ²)) (the paper's optimal denoiser): the
    minimiser of the denoising loss on the empirical distribution, and one step of Gaussian
    mean shift with bandwidth σ. The softmax streams over chunks of `data` with a running
    max (online log-sum-exp, `lax.scan`), so memory is O(B·chunk + B·d) whatever N is (50k
    images fit) and no exponent ever overflows or underflows to 0/0. Distances are float32
    GEMMs ‖x‖² − 2x·y + ‖y‖² at HIGHEST precision; their rounding is ~1e-7·‖x‖², which
    changes a logit by ~1e-7·‖x‖²/σ² (negligible unless x is far from the data at tiny σ).

    Args:
      x: [B, ...] noisy states.
      sigma: scalar or [B] noise levels, > 0.
      data: [N, ...] the data set (same trailing shape as x).
      chunk_size: data rows per scan step; None puts all N in one chunk.

    Returns:
      [B, ...] float32, D(x; σ).

    Raises:
      ValueError: sigma ≤ 0 (when concrete) or of a wrong shape, data's trailing shape not
        x's, an empty data set, or chunk_size < 1.
    """
    x = jnp.asarray(x, jnp.float32)
    data = jnp.asarray(data, jnp.float32)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis [B, ...], got shape {x.shape}.")
    if data.ndim < 1 or data.shape[0] < 1:
        raise ValueError(f"data must be a non-empty [N, ...] array, got shape {data.shape}.")
    if data.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"data's example shape {data.shape[1:]} must equal x's {x.shape[1:]} "
            f"(data: {data.shape}, x: {x.shape})."
        )
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
    batch, n = x.shape[0], data.shape[0]
    sigma = _check_sigma(sigma, batch)
    xf = x.reshape(batch, -1)  # [B, d]
    yf = data.reshape(n, -1)  # [N, d]
    inv_two_var = 0.5 / jnp.square(sigma)  # [B]
    x_sq = jnp.sum(jnp.square(xf), axis=1)  # [B]

    def update(carry, y):  # y: [C, d]
        run_max, norm, acc = carry  # [B], [B], [B, d]
        y_sq = jnp.sum(jnp.square(y), axis=1)  # [C]
        cross = jnp.dot(xf, y.T, precision=_HIGHEST)  # [B, C]
        dist = jnp.maximum(x_sq[:, None] - 2.0 * cross + y_sq[None, :], 0.0)
        logits = -dist * inv_two_var[:, None]  # [B, C]
        new_max = jnp.maximum(run_max, jnp.max(logits, axis=1))
        rescale = jnp.exp(run_max - new_max)  # 0 on the first chunk (run_max = −inf)
        p = jnp.exp(logits - new_max[:, None])  # [B, C]
        norm = norm * rescale + jnp.sum(p, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(p, y, precision=_HIGHEST)
        return (new_max, norm, acc), None

    init = (
        jnp.full((batch,), -jnp.inf, jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros_like(xf),
    )
    chunk = n if chunk_size is None else min(int(chunk_size), n)
    num_full = n // chunk
    carry, _ = jax.lax.scan(update, init, yf[: num_full * chunk].reshape(num_full, chunk, -1))
    if n % chunk:
        carry, _ = update(carry, yf[num_full * chunk :])
    _, norm, acc = carry
    return (acc / norm[:, None]).reshape(x.shape)


def mean_shift_step(
    x: jax.Array,
    sigma: jax.Array | float,
    data: jax.Array,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> jax.Array:
    """One Gaussian-kernel mean-shift iteration with bandwidth σ: m(x) = Σ K(x−y_k) y_k / Σ K(x−y_k).

    With K(u) = exp(−‖u‖²/(2σ²)) this is exactly `optimal_denoiser` (the paper's mean-shift link):
    the posterior mean under Gaussian noise of level σ is the kernel-weighted data mean.

    Identity (checked in the tests): an Euler step of the PF-ODE (1) from σ straight to 0,
    x + (0 − σ)·(x − D(x; σ))/σ, equals D(x; σ) = m(x): a mean-shift step. An Euler step to
    σ' > 0 is the convex combination (σ'/σ)·x + (1 − σ'/σ)·m(x), so Euler sampling with the
    optimal denoiser is mean shift with an annealed bandwidth and a damped step.

    Args:
      x: [B, ...] current points.
      sigma: scalar or [B] bandwidths, > 0.
      data: [N, ...] the points the kernel density is built on.
      chunk_size: as in `optimal_denoiser`.

    Returns:
      [B, ...] float32, the shifted points m(x).
    """
    return optimal_denoiser(x, sigma, data, chunk_size=chunk_size)


def gaussian_denoiser(mean: jax.Array | float, std: float) -> Denoiser:
    """The exact denoiser of y ~ N(mean, std²·I): D(x; σ) = mean + std²/(std²+σ²)·(x − mean).

    Its PF-ODE has the closed-form solution x(σ) = mean + √(std²+σ²)/√(std²+σ₀²)·(x(σ₀) − mean),
    which the tests use to check the solvers' orders.
    """

    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
        gain = (std**2 / (std**2 + jnp.square(sigma))).reshape((-1,) + (1,) * (x.ndim - 1))
        return mean + gain * (x - mean)

    return denoise


# --------------------------------------------------------------------------------------------
# A trained VP model as a VE denoiser


def vp_model_as_denoiser(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: schedules.Schedule,
    target: str = "eps",
    learn_sigma: bool = False,
) -> Denoiser:
    """Wraps a discrete-time VP network as a VE denoiser D(x; σ) for the PF-ODE (1).

    A VP state x_t = √ᾱ_t·y + √(1−ᾱ_t)·ε is a VE state x = x_t/√ᾱ_t at σ = √((1−ᾱ_t)/ᾱ_t).
    For a VE state x at level σ the wrapper

    1. scales it to the VP input x_vp = x/√(1+σ²) (ᾱ = 1/(1+σ²), `ve_to_vp_alpha_cumprod`);
    2. feeds the network the nearest grid timestep in log σ, t = `sigma_to_timestep(σ)`;
    3. converts the output (ε, x0 or v, with `diffusion.x0_and_eps_from_output` at t) to ε̂
       and returns D = x − σ·ε̂.

    Discretisation. The network only knows the grid σ_t. When σ = σ_t (put the σ ladder on
    the grid with `snap_sigmas`, as `run_geometry` does) step 1 is the network's own input
    scaling √ᾱ_t and D is exactly the model's predicted x0. Off the grid the network sees a
    state at level σ labelled σ_t; D = x − σ·ε̂ is then EDM's convention for VP/iDDPM
    networks (Karras et al. 2022, Table 1, `iDDPMPrecond`): ε̂ is read as the unit noise, so
    the ODE velocity (x − D)/σ = ε̂ stays the network's ε-prediction. (Using the predicted
    x0 at t instead would rescale x by √ᾱ_σ/√ᾱ_t, a jump at every change of t.)

    Args:
      model_fn: (x_vp [B, ...], t [B] int32) -> network output [B, ..., C or 2C].
      schedule: the VP schedule the network was trained on.
      target: the network's parameterisation, 'eps', 'x0' or 'v'.
      learn_sigma: the output has 2C channels (mean, variance); only the mean part is used.

    Returns:
      denoise(x [B, ...], sigma scalar or [B]) -> D [B, ...] float32.
    """
    if target not in diffusion.TARGETS:
        raise ValueError(
            f"target {target!r} is unknown; valid targets: {', '.join(diffusion.TARGETS)}."
        )

    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
        bshape = (-1,) + (1,) * (x.ndim - 1)
        t = schedules.sigma_to_timestep(schedule, sigma)  # [B]
        x_vp = x * jnp.sqrt(schedules.ve_to_vp_alpha_cumprod(sigma)).reshape(bshape)
        out = model_fn(x_vp, t).astype(jnp.float32)
        if learn_sigma:
            out, _ = diffusion.split_learned_sigma(out, x.shape[-1])
        _, eps = diffusion.x0_and_eps_from_output(target, schedule, x_vp, t, out)
        return x - sigma.reshape(bshape) * eps

    return denoise


def snap_sigmas(sigmas: np.ndarray, schedule: schedules.Schedule) -> np.ndarray:
    """Moves each σ > 0 of a ladder to the nearest grid level σ_t (in log σ), keeps σ = 0.

    Levels that snap to the same t are merged (a step of length 0 is no step), so the result
    can be shorter than the input. Returns float32 [M], still strictly decreasing.
    """
    sigmas = np.asarray(sigmas, np.float64)
    grid = np.asarray(schedule.sigmas, np.float64)
    out = []
    for s in sigmas:
        if s > 0:
            s = float(grid[int(np.argmin(np.abs(np.log(grid) - np.log(s))))])
        if not out or s < out[-1]:
            out.append(s)
    return np.asarray(out, np.float32)


# --------------------------------------------------------------------------------------------
# ODE solvers on a σ ladder


class Trajectory(NamedTuple):
    """One solve of the PF-ODE (1) for a batch.

    Attributes:
      sigmas: [N+1] the ladder σ_0 > σ_1 > … > σ_N ≥ 0.
      samples: [N+1, B, ...] the sampling trajectory, samples[i] = x at σ_i.
      denoised: [N, B, ...] the denoising trajectory, denoised[i] = D(samples[i]; σ_i).
      extra_denoised: [N, B, ...] the second denoiser call of step i: Heun's D at the Euler
        predictor (level σ_{i+1}), DPM-Solver-2's D at the log-midpoint σ_s = √(σ_i σ_{i+1});
        equal to denoised[i] where the step makes no second call (Euler, DPM-Solver++(2M),
        and every step to σ = 0).
    """

    sigmas: jax.Array
    samples: jax.Array
    denoised: jax.Array
    extra_denoised: jax.Array


def _check_ladder(sigmas: Any) -> np.ndarray | jax.Array:
    if _is_tracer(sigmas):
        return sigmas
    s = np.asarray(sigmas, np.float64)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"sigmas must be a 1-D ladder of ≥ 2 levels, got shape {s.shape}.")
    if not (np.all(np.isfinite(s)) and np.all(s[:-1] > 0) and s[-1] >= 0):
        raise ValueError(f"sigmas must be finite and > 0 (only the last may be 0), got {s}.")
    if not np.all(np.diff(s) < 0):
        raise ValueError(f"sigmas must be strictly decreasing, got {s}.")
    return np.asarray(sigmas, np.float32)


def euler_step(x: jax.Array, sigma, sigma_next, denoised: jax.Array) -> jax.Array:
    """EDM's Euler step of (1): x + (σ' − σ)·(x − D)/σ. sigma, sigma_next: scalars."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def euler_from_denoised(x: jax.Array, sigma, sigma_next, denoised: jax.Array) -> jax.Array:
    """The same Euler step written as mean shift: (σ'/σ)·x + (1 − σ'/σ)·D (as in the paper).

    Every solver in `SOLVERS` is this step with D replaced by `effective_denoised`.
    sigma, sigma_next: scalars, or arrays broadcastable against x with explicit axes.
    """
    ratio = sigma_next / sigma
    return ratio * x + (1.0 - ratio) * denoised


def solve(denoise: Denoiser, x_init: jax.Array, sigmas: Any, method: str = "heun") -> Trajectory:
    """Integrates the PF-ODE (1) down a σ ladder with `lax.scan`, recording both trajectories.

    Methods (each one network call per step unless noted; the step to σ = 0 is always Euler):

    * 'euler': x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_i, d_i = (x_i − D_i)/σ_i.
    * 'heun': EDM Algorithm 1 without churn (Karras et al. 2022): Euler predictor x̃, then
      x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d̃)/2 with d̃ = (x̃ − D(x̃; σ_{i+1}))/σ_{i+1}
      (two calls).
    * 'dpm2': DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r = 1/2) in ε form with α = 1,
      λ = −log σ, h = λ_{i+1} − λ_i: u = x_i − σ_s·(e^{h/2} − 1)·ε_i at σ_s = √(σ_i σ_{i+1}),
      x_{i+1} = x_i − σ_{i+1}·(e^h − 1)·ε(u; σ_s), ε = (x − D)/σ (two calls).
    * 'dpmpp_2m': DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): x_{i+1} =
      (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·((1 + 1/2r)·D_i − (1/2r)·D_{i−1}), r = h_{i−1}/h;
      first-order at the first step.

    Args:
      denoise: (x [B, ...], sigma [B]) -> D(x; σ) [B, ...].
      x_init: [B, ...] the state at σ_0 (e.g. σ_0·n, n ~ N(0, I)).
      sigmas: [N+1] strictly decreasing ladder, e.g. `schedules.edm_sigmas(N)` (ends at 0).
      method: one of `SOLVERS`.

    Returns:
      A `Trajectory`.
    """
    if method not in SOLVERS:
        raise ValueError(f"method {method!r} is unknown; valid methods: {', '.join(SOLVERS)}.")
    sigmas = jnp.asarray(_check_ladder(sigmas), jnp.float32)
    x_init = jnp.asarray(x_init, jnp.float32)
    batch = x_init.shape[0]
    num_steps = sigmas.shape[0] - 1

    def call(x, sigma):
        return denoise(x, jnp.full((batch,), sigma, jnp.float32)).astype(jnp.float32)

    def body(carry, inputs):
        x, d_prev = carry
        i, sigma, sigma_next, sigma_prev = inputs
        d = call(x, sigma)
        x_euler = euler_step(x, sigma, sigma_next, d)
        last = sigma_next <= 0
        safe_next = jnp.where(last, 0.5 * sigma, sigma_next)  # keeps logs finite; unused when last
        if method == "euler":
            x_next, extra = x_euler, d
        elif method == "heun":

            def heun():
                d2 = call(x_euler, safe_next)
                slope = 0.5 * ((x - d) / sigma + (x_euler - d2) / safe_next)
                return x + (sigma_next - sigma) * slope, d2

            x_next, extra = jax.lax.cond(last, lambda: (x_euler, d), heun)
        elif method == "dpm2":

            def dpm2():
                h = jnp.log(sigma) - jnp.log(safe_next)
                sigma_mid = jnp.sqrt(sigma * safe_next)
                eps = (x - d) / sigma
                u = x - sigma_mid * jnp.expm1(0.5 * h) * eps
                d2 = call(u, sigma_mid)
                eps2 = (u - d2) / sigma_mid
                return x - safe_next * jnp.expm1(h) * eps2, d2

            x_next, extra = jax.lax.cond(last, lambda: (x_euler, d), dpm2)
        else:  # dpmpp_2m
            h = jnp.log(sigma) - jnp.log(safe_next)
            h_last = jnp.log(sigma_prev) - jnp.log(sigma)
            r = h_last / h
            second = (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev
            d_bar = jnp.where((i > 0) & ~last, second, d)
            x_next = (sigma_next / sigma) * x - jnp.expm1(-h) * d_bar
            x_next = jnp.where(last, d, x_next)
            extra = d
        return (x_next, d), (x_next, d, extra)

    idx = jnp.arange(num_steps)
    sigma_prev = jnp.concatenate([sigmas[:1] * 2.0, sigmas[:-2]])  # index 0 is unused
    _, (xs, ds, extras) = jax.lax.scan(
        body, (x_init, jnp.zeros_like(x_init)), (idx, sigmas[:-1], sigmas[1:], sigma_prev)
    )
    samples = jnp.concatenate([x_init[None], xs], axis=0)
    return Trajectory(sigmas=sigmas, samples=samples, denoised=ds, extra_denoised=extras)


# --------------------------------------------------------------------------------------------
# Second-order solvers as finite differences of the denoising trajectory (as in the paper)


def effective_denoised(traj: Trajectory, method: str) -> np.ndarray:
    """The D̄_i for which step i of `method` is the Euler/mean-shift step `euler_from_denoised`.

    With D_i = D(x_i; σ_i), D̃_i = traj.extra_denoised[i], λ = −log σ:

    * euler: D̄ = D_i.
    * heun: D̄ = D_i + σ_i/(2σ_{i+1})·(D̃_i − D_i), a forward difference of the denoising
      trajectory. It tends to the plain average (D_i + D̃_i)/2 as σ_{i+1}/σ_i → 1, and is the
      plain average exactly for the trapezoidal rule in (x/σ, 1/σ), where (1) is
      d(x/σ)/d(1/σ) = D; EDM's Heun applies the rule in (x, σ) instead.
    * dpm2: D̄ = D_i + e^{h/2}·(D(u; σ_s) − D_i), e^{h/2} = √(σ_i/σ_{i+1}).
    * dpmpp_2m: D̄ = D_i + (h_i/2)·(D_i − D_{i−1})/h_{i−1}: the denoising trajectory
      extrapolated linearly in log σ to the step's log-midpoint (a backward difference).

    Every step to σ = 0, and the first step of dpmpp_2m, uses D̄ = D_i. Computed in float64.

    Returns:
      [N, B, ...] float64.
    """
    if method not in SOLVERS:
        raise ValueError(f"method {method!r} is unknown; valid methods: {', '.join(SOLVERS)}.")
    sig = np.asarray(traj.sigmas, np.float64)
    d = np.asarray(traj.denoised, np.float64)
    extra = np.asarray(traj.extra_denoised, np.float64)
    n = d.shape[0]
    cur, nxt = sig[:-1], sig[1:]
    has_next = nxt > 0
    safe_next = np.where(has_next, nxt, cur)
    bshape = (n,) + (1,) * (d.ndim - 1)
    if method == "euler":
        coef, diff = np.zeros(n), np.zeros_like(d)
    elif method == "heun":
        coef, diff = cur / (2.0 * safe_next), extra - d
    elif method == "dpm2":
        coef, diff = np.sqrt(cur / safe_next), extra - d
    else:
        lam = -np.log(np.where(sig > 0, sig, 1.0))
        h = lam[1:] - lam[:-1]  # [N]; h[N−1] is junk when σ_N = 0 (masked below)
        coef = np.zeros(n)
        coef[1:] = 0.5 * h[1:] / h[:-1]
        diff = np.zeros_like(d)
        diff[1:] = d[1:] - d[:-1]
    coef = np.where(has_next, coef, 0.0)
    return d + coef.reshape(bshape) * diff


def finite_difference_check(traj: Trajectory, method: str) -> dict[str, Any]:
    """How exactly `method`'s own steps equal Euler steps with the finite-difference D̄.

    Recomputes every step as `euler_from_denoised(x_i, σ_i, σ_{i+1}, D̄_i)` in float64 from the
    recorded float32 trajectory and compares with the solver's float32 x_{i+1}.

    Returns:
      max_abs_error: max |x_{i+1}^{FD} − x_{i+1}^{solver}| over all steps and entries.
      max_rel_error: the same per step, divided by max |x_{i+1}|, maximised over steps.
      For 'heun' also average_form_max_rel_error: the same with D̄ = (D_i + D̃_i)/2, which is
        *not* an identity for EDM's Heun (see `effective_denoised`); it shrinks with the step.
    """
    sig = np.asarray(traj.sigmas, np.float64)
    x = np.asarray(traj.samples, np.float64)
    n = x.shape[0] - 1
    bshape = (n,) + (1,) * (x.ndim - 1)
    cur, nxt = sig[:-1].reshape(bshape), sig[1:].reshape(bshape)

    def errors(d_bar):
        fd = euler_from_denoised(x[:-1], cur, nxt, d_bar)
        err = np.abs(fd - x[1:]).reshape(n, -1).max(axis=1)
        scale = np.maximum(np.abs(x[1:]).reshape(n, -1).max(axis=1), 1e-30)
        return float(err.max()), float((err / scale).max())

    max_abs, max_rel = errors(effective_denoised(traj, method))
    out: dict[str, Any] = {"max_abs_error": max_abs, "max_rel_error": max_rel}
    if method == "heun":
        d = np.asarray(traj.denoised, np.float64)
        extra = np.asarray(traj.extra_denoised, np.float64)
        out["average_form_max_rel_error"] = errors(0.5 * (d + extra))[1]
    return out


# --------------------------------------------------------------------------------------------
# Measurements (numpy float64 on the host)


def _flat(a: Any, lead: int) -> np.ndarray:
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
    x = _flat(samples, 2)  # [N+1, B, d]
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


def convergence(traj: Trajectory) -> dict[str, np.ndarray]:
    """Distances of the sampling and denoising trajectories to the final sample (the paper).

    Returns (float64 arrays):
      sample_to_final: [N+1, B] ‖x_i − x_N‖.
      denoised_to_final: [N, B] ‖D(x_i; σ_i) − x_N‖.
      ratio: [N] mean over B of denoised_to_final / sample_to_final (< 1: the denoising
        trajectory is closer to where the sampler ends).
    """
    x = _flat(traj.samples, 2)
    d = _flat(traj.denoised, 2)
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


def curvature(traj: Trajectory, method: str) -> dict[str, Any]:
    """How the denoising trajectory steers the sampling trajectory (the paper).

    Step i moves x along x_i − D̄_i (`effective_denoised`), and x_{i+1} − D̄_{i+1} =
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
    x = _flat(traj.samples, 2)
    d = _flat(traj.denoised, 2)
    d_bar = _flat(effective_denoised(traj, method), 2)
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
    p = _flat(points, 1)
    y = _flat(data, 1)
    dist = np.sum(p * p, 1)[:, None] - 2.0 * p @ y.T + np.sum(y * y, 1)[None, :]
    return np.sqrt(np.maximum(dist.min(axis=1), 0.0))


# --------------------------------------------------------------------------------------------
# Beyond the paper: σ schedules by dynamic programming over local truncation errors


class StepCosts(NamedTuple):
    """Local errors of single solver steps between candidate levels of a teacher ladder.

    Attributes:
      sigmas: [M] candidate levels, strictly decreasing, the last 0 (a subset of the teacher's).
      teacher_index: [M] int, position of each candidate in the teacher's ladder.
      cost: [M, M] float64; cost[i, j] (i < j) is the mean over teacher trajectories of
        ‖step(x^T_{σ_i}; σ_i → σ_j) − x^T_{σ_j}‖, inf where not computed (j ≤ i, or j − i
        beyond the window).
      solver: 'euler' or 'heun' (the step; a step to σ = 0 is Euler for both).
    """

    sigmas: np.ndarray
    teacher_index: np.ndarray
    cost: np.ndarray
    solver: str


DP_SOLVERS = ("euler", "heun")


def nfe_to_steps(nfe: int, solver: str) -> int:
    """Steps K affordable with `nfe` denoiser calls, counted as EDM does (Karras et al. 2022).

    Euler: one call per step, K = nfe. Heun: two calls per step except the last (to σ = 0,
    an Euler step), NFE = 2K − 1, so K = ⌊(nfe + 1)/2⌋ (an even budget leaves one call unused).
    """
    if solver not in DP_SOLVERS:
        raise ValueError(f"solver {solver!r} is unknown; valid solvers: {', '.join(DP_SOLVERS)}.")
    if not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}.")
    return int(nfe) if solver == "euler" else (int(nfe) + 1) // 2


def steps_to_nfe(num_steps: int, solver: str) -> int:
    """The inverse count: K for Euler, 2K − 1 for Heun (EDM's convention)."""
    return int(num_steps) if solver == "euler" else 2 * int(num_steps) - 1


def _teacher_arrays(teacher: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(teacher, Trajectory):
        sig, samples = teacher.sigmas, teacher.samples
    else:
        sig, samples = teacher
    sig = np.asarray(_check_ladder(np.asarray(sig)), np.float64)
    samples = np.asarray(samples, np.float32)
    if sig[-1] != 0:
        raise ValueError(f"the teacher's sigmas must end at 0, got {sig[-1]}.")
    if samples.ndim < 2 or samples.shape[0] != sig.shape[0]:
        raise ValueError(
            f"teacher samples must have shape [F+1, B, ...] with F+1 = {sig.shape[0]} levels, "
            f"got {samples.shape}."
        )
    return sig, samples


def candidate_indices(teacher_sigmas: Any, num_candidates: int) -> np.ndarray:
    """Positions in a teacher ladder (ending at 0) of ≈ `num_candidates` levels, log-σ spaced.

    Always keeps the first level (σ_max), the smallest positive one and the final 0. Levels
    that several log-uniform targets pick are kept once, so fewer may come back.
    """
    sig = np.asarray(teacher_sigmas, np.float64)
    if not isinstance(num_candidates, (int, np.integer)) or num_candidates < 3:
        raise ValueError(f"num_candidates must be an integer ≥ 3, got {num_candidates!r}.")
    positive = sig.size - 1
    if positive + 1 <= num_candidates:
        return np.arange(sig.size)
    log_sig = np.log(sig[:positive])
    targets = np.linspace(log_sig[0], log_sig[-1], num_candidates - 1)
    picked = np.unique([int(np.argmin(np.abs(log_sig - t))) for t in targets])
    return np.append(picked, positive)


def step_costs(
    teacher: Trajectory | tuple[Any, Any],
    *,
    denoise: Denoiser,
    solver: str = "heun",
    num_candidates: int = 64,
    window: int | None = None,
) -> StepCosts:
    """The local-error table for `dp_schedule`: one solver step between every candidate pair.

    For each candidate i the denoiser is evaluated once at the teacher states x^T_{σ_i}
    (D(x; σ_i), shared by every j) and, for Heun, once more per target j at the Euler
    predictor; all targets of one i are one batched call (jitted; the window is padded to a
    power of two so only a few shapes compile). Cost per pair: mean over the B teacher
    trajectories of the Euclidean norm of the difference to x^T_{σ_j}.

    Args:
      teacher: a fine `Trajectory` (or (sigmas [F+1], samples [F+1, B, ...])) ending at 0,
        e.g. Heun with 200–1000 steps. Its states are where the steps start and what they
        are scored against.
      denoise: the denoiser the teacher was solved with.
      solver: 'euler' or 'heun' (EDM's Heun; its step to σ = 0 is Euler, as in `solve`).
      num_candidates: size of the candidate grid (`candidate_indices`); cost is
        O(num_candidates²·B) denoiser calls for the full window.
      window: largest j − i considered (None: all pairs). A window excludes long jumps, so
        only ladders whose steps all fit are reachable.

    Returns:
      A `StepCosts`.
    """
    if solver not in DP_SOLVERS:
        raise ValueError(f"solver {solver!r} is unknown; valid solvers: {', '.join(DP_SOLVERS)}.")
    sig, samples = _teacher_arrays(teacher)
    idx = candidate_indices(sig, num_candidates)
    cand = sig[idx]
    m = idx.size
    if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}.")
    width = m - 1 if window is None else min(int(window), m - 1)
    batch = samples.shape[1]
    ex_shape = samples.shape[2:]

    @jax.jit
    def errors(x, sigma, sigma_next, target):
        # x: [B, ...]; sigma: []; sigma_next: [W]; target: [W, B, ...] -> [W, B]
        w = sigma_next.shape[0]
        d = denoise(x, jnp.full((batch,), sigma, jnp.float32)).astype(jnp.float32)
        bshape = (w,) + (1,) * (x.ndim)
        sn = sigma_next.reshape(bshape)
        x_euler = x[None] + (sn - sigma) * (x - d)[None] / sigma  # [W, B, ...]
        if solver == "euler":
            x_next = x_euler
        else:
            last = sn <= 0
            safe = jnp.where(last, sigma, sn)
            flat = x_euler.reshape((w * batch, *ex_shape))
            d2 = denoise(flat, jnp.repeat(safe.reshape(w), batch)).astype(jnp.float32)
            d2 = d2.reshape(x_euler.shape)
            slope = 0.5 * ((x - d)[None] / sigma + (x_euler - d2) / safe)
            x_next = jnp.where(last, x_euler, x[None] + (sn - sigma) * slope)
        diff = (x_next - target).reshape(w, batch, -1)
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))

    cost = np.full((m, m), np.inf)
    cand32 = cand.astype(np.float32)
    for i in range(m - 1):
        js = np.arange(i + 1, min(i + width, m - 1) + 1)
        pad = max(8, 1 << int(np.ceil(np.log2(js.size))))
        js_pad = np.concatenate([js, np.full(pad - js.size, js[-1])])
        err = errors(
            samples[idx[i]], float(cand32[i]), cand32[js_pad], samples[idx[js_pad]]
        )  # [pad, B]
        cost[i, js] = np.asarray(err, np.float64)[: js.size].mean(axis=1)
    return StepCosts(sigmas=cand.astype(np.float32), teacher_index=idx, cost=cost, solver=solver)


def dp_path(
    costs: StepCosts, num_steps: int, *, through_sigma_min: bool = False
) -> tuple[np.ndarray, float]:
    """The K-step path 0 = i_0 < … < i_K = M − 1 through the candidates with least summed cost.

    V_k(j) = min_i V_{k−1}(i) + cost[i, j], V_0 = [0, inf, …]: O(K·M²), exact.
    With `through_sigma_min` the last step must start at the smallest positive candidate
    (i_{K−1} = M − 2, as EDM's ladders end σ_min → 0); otherwise the DP may stop early with
    an Euler step to 0 from a large σ, which returns the denoiser output D(x; σ) there.

    Returns:
      (indices [K+1] into `costs.sigmas`, the summed cost).
    """
    m = costs.sigmas.shape[0]
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= m - 1:
        raise ValueError(
            f"num_steps must be an integer in [1, {m - 1}] (the candidate steps), got {num_steps!r}."
        )
    cost = costs.cost
    if through_sigma_min:
        cost = cost.copy()
        cost[: m - 2, m - 1] = np.inf
    value = np.full(m, np.inf)
    value[0] = 0.0
    back = np.zeros((num_steps, m), np.int64)
    for k in range(num_steps):
        total = value[:, None] + cost  # [from, to]
        back[k] = np.argmin(total, axis=0)
        value = total[back[k], np.arange(m)]
    if not np.isfinite(value[-1]):
        raise ValueError(
            f"no {num_steps}-step path reaches σ = 0 within the window; widen `window`."
        )
    path = [m - 1]
    for k in range(num_steps - 1, -1, -1):
        path.append(int(back[k, path[-1]]))
    return np.asarray(path[::-1]), float(value[-1])


def snap_to_candidates(sigmas: Any, costs: StepCosts) -> np.ndarray:
    """Indices of the candidates nearest (in log σ) to each level of a ladder; 0 maps to 0.

    The first level maps to candidate 0 (σ_max) and duplicates are merged, so the result is
    a valid path for `path_cost`.
    """
    sig = np.asarray(sigmas, np.float64)
    cand = np.asarray(costs.sigmas, np.float64)
    log_cand = np.log(cand[:-1])
    out = [0]
    for s in sig[1:]:
        j = cand.size - 1 if s <= 0 else int(np.argmin(np.abs(log_cand - np.log(s))))
        if j > out[-1]:
            out.append(j)
    if out[-1] != cand.size - 1:
        out.append(cand.size - 1)
    return np.asarray(out)


def path_cost(costs: StepCosts, indices: Any) -> float:
    """Σ cost[i_k, i_{k+1}] along a path of candidate indices (the DP objective)."""
    idx = np.asarray(indices)
    return float(np.sum(costs.cost[idx[:-1], idx[1:]]))


def dp_schedule(
    teacher: Trajectory | tuple[Any, Any] | None,
    nfe: int,
    *,
    denoise: Denoiser | None = None,
    solver: str = "heun",
    num_candidates: int = 64,
    window: int | None = None,
    costs: StepCosts | None = None,
    through_sigma_min: bool = False,
) -> np.ndarray:
    """A σ ladder for `nfe` denoiser calls that minimises the summed local truncation error.

    Dynamic programming (`dp_path`) over a candidate grid taken from a fine "teacher"
    solution: the cost of a step σ_i → σ_j is the mean distance between one `solver` step
    started at the teacher's state at σ_i and the teacher's state at σ_j (`step_costs`). The
    objective is the *sum of local errors*; how an error made early is carried (damped or
    amplified) to the end, i.e. the global error, is not modelled. Steps: K =
    `nfe_to_steps(nfe, solver)` (Heun: NFE = 2K − 1, the last step Euler, as EDM counts).

    Args:
      teacher: the fine teacher trajectory, or (sigmas_fine [F+1], samples_fine [F+1, B, ...]);
        may be None when `costs` is given.
      nfe: the budget of denoiser calls.
      denoise: the teacher's denoiser (needed unless `costs` is given).
      solver: 'heun' or 'euler'.
      num_candidates, window: as in `step_costs`.
      costs: a precomputed `step_costs` table (reuse it across budgets; its solver wins).
      through_sigma_min: end with σ_min → 0 like EDM (see `dp_path`).

    Returns:
      float32 [K+1], σ descending from the teacher's σ_max, ending with 0.
    """
    if costs is None:
        if teacher is None or denoise is None:
            raise ValueError("dp_schedule needs `teacher` and `denoise`, or precomputed `costs`.")
        costs = step_costs(
            teacher,
            denoise=denoise,
            solver=solver,
            num_candidates=num_candidates,
            window=window,
        )
    path, _ = dp_path(costs, nfe_to_steps(nfe, costs.solver), through_sigma_min=through_sigma_min)
    return np.asarray(costs.sigmas[path], np.float32)


def uniform_t_sigmas(schedule: schedules.Schedule, num_steps: int, t_max: int) -> np.ndarray:
    """σ at `num_steps` evenly spaced timesteps from t_max down to 0 of a VP grid, then 0.

    The "uniform-in-t" ladder (DDIM's spacing) over the same range as a snapped EDM ladder.
    Timesteps that round to the same integer are merged. float32 [≤ num_steps + 1].
    """
    ts = np.unique(np.round(np.linspace(t_max, 0, num_steps)).astype(np.int64))[::-1]
    grid = np.asarray(schedule.sigmas, np.float64)
    return np.append(grid[ts], 0.0).astype(np.float32)


def denoiser_settles_at(
    traj: Trajectory,
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


def _fid_fn():
    """`evaluation.digits_fid` if it exists and runs (its feature weights are present)."""
    try:
        from ddpm_bs import evaluation  # optional: FID is skipped without it
    except ImportError:
        return None
    fid = getattr(evaluation, "digits_fid", None)
    if fid is None:
        return None
    try:
        fid(np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    except (OSError, ValueError) as e:  # e.g. the feature weights are not built yet
        logging.warning("digits FID unavailable (%s); reporting RMSE only.", e)
        return None
    return fid


def compare_schedules(
    config,
    workdir: str,
    nfes: Sequence[int] = (4, 5, 6, 8, 10),
    *,
    params: Any = None,
    solver: str = "heun",
    denoisers: Sequence[str] = ("model", "optimal"),
    num_fit: int = 16,
    num_eval: int = 64,
    num_fid: int = 500,
    teacher_stride: int = 2,
    num_candidates: int = 64,
    window: int | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    plot: bool = True,
) -> dict[str, Any]:
    """EDM's ρ = 7 ladder vs uniform-in-t vs `dp_schedule` at each NFE budget, on one σ grid.

    'dp' is the free DP ladder; 'dp_sigma_min' is forced to end σ_min → 0 as EDM's does.

    The σ grid is the model's VP timestep grid (`config.diffusion`): every ladder is put on it
    (`snap_sigmas`), from the level nearest σ_max = 80 (t_max) down to σ_0, then 0. The
    teacher is Heun on every `teacher_stride`-th grid level of that range. For each denoiser
    (the trained model via `vp_model_as_denoiser`, and the optimal denoiser of the data):

    1. `num_fit` teacher trajectories fit the DP (`step_costs`, once per denoiser);
    2. `num_eval` other noises (held out) give the teacher's final samples, and every ladder
       is scored by the RMSE (per pixel, over the held-out batch) of its final samples to
       them;
    3. when `ddpm_bs.evaluation.digits_fid` exists, `num_fid` samples per ladder get a
       digits FID (`num_fid = 0` skips it).

    Budgets map to steps by `nfe_to_steps` (Heun: NFE = 2K − 1); `nfe_used` reports the calls
    actually made. Noises come from `config.seed` in their own stream. Writes
    `<workdir>/geometry/schedules.png` (RMSE vs NFE) when `plot`.

    A ladder whose samples overflow (EDM's ρ = 7 with Heun at K ≤ 3 jumps from σ = 80 to
    σ ≈ 0.01 in one step, and the Heun corrector explodes) gets RMSE/FID NaN (null in JSON).

    Returns:
      JSON-able dict: per denoiser, ladders and rmse/fid per schedule, indexed like `nfes`;
      for the model also `denoiser_settles_at` measured on the teacher.
    """
    nfes = [int(n) for n in nfes]
    steps = [nfe_to_steps(n, solver) for n in nfes]
    spec = data_lib.DataSpec.from_config(config.data)
    images = np.asarray(data_lib.load_all(spec), np.float32)
    if images.shape[0] < 1:
        raise ValueError(f"data set {spec.name!r} is empty: the data has shape {images.shape}.")
    shape = images.shape[1:]
    schedule = schedules.get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    grid = np.asarray(schedule.sigmas, np.float64)
    t_max = int(np.argmin(np.abs(np.log(grid) - np.log(schedules.SIGMA_MAX))))
    teacher_t = np.unique(np.append(np.arange(t_max, -1, -teacher_stride), 0))[::-1]
    teacher_sigmas = np.append(grid[teacher_t], 0.0).astype(np.float32)
    key = jax.random.fold_in(jax.random.key(config.seed), _GEOMETRY_STREAM + 1)
    k_fit, k_eval, k_fid = jax.random.split(key, 3)
    sigma_max = float(teacher_sigmas[0])
    x_fit = sigma_max * jax.random.normal(k_fit, (num_fit, *shape), jnp.float32)
    x_eval = sigma_max * jax.random.normal(k_eval, (num_eval, *shape), jnp.float32)
    x_fid = sigma_max * jax.random.normal(k_fid, (max(num_fid, 1), *shape), jnp.float32)
    fid = _fid_fn() if num_fid > 0 else None

    ladders_by_k = {
        "edm_rho7": {k: snap_sigmas(schedules.edm_sigmas(k), schedule) for k in set(steps)},
        "uniform_t": {k: uniform_t_sigmas(schedule, k, t_max) for k in set(steps)},
    }
    denoise_fns: dict[str, Denoiser] = {}
    if "optimal" in denoisers:
        data_dev = jnp.asarray(images)
        denoise_fns["optimal"] = functools.partial(
            optimal_denoiser, data=data_dev, chunk_size=chunk_size
        )
    if "model" in denoisers and config.model.num_classes:
        logging.warning("compare_schedules: class-conditional models are not supported; skipped.")
    elif "model" in denoisers:
        model_params, _ = _model_params(config, workdir, params)
        if model_params is not None:
            from ddpm_bs import train

            model = train.build_model(config)

            def model_fn(x_vp, t):
                return model.apply({"params": model_params}, x_vp, t, None, train=False)

            denoise_fns["model"] = vp_model_as_denoiser(
                model_fn, schedule, config.loss.target, config.model.learn_sigma
            )

    result: dict[str, Any] = {
        "solver": solver,
        "nfe_budget": nfes,
        "num_steps": steps,
        "nfe_used": [steps_to_nfe(k, solver) for k in steps],
        "teacher": {"solver": "heun", "num_steps": int(teacher_sigmas.size - 1)},
        "grid_t_max": t_max,
        "num_fit": num_fit,
        "num_eval": num_eval,
        "num_fid": num_fid if fid is not None else 0,
        "fid_available": fid is not None,
        "objective": "summed local truncation error of single steps from teacher states",
    }
    for name, denoise in denoise_fns.items():
        run = jax.jit(functools.partial(solve, denoise), static_argnames="method")
        teacher_fit = jax.device_get(run(x_fit, teacher_sigmas, method="heun"))
        teacher_eval = np.asarray(run(x_eval, teacher_sigmas, method="heun").samples[-1])
        costs = step_costs(
            teacher_fit,
            denoise=denoise,
            solver=solver,
            num_candidates=num_candidates,
            window=window,
        )
        ladders = dict(ladders_by_k)
        ladders["dp"] = {k: costs.sigmas[dp_path(costs, k)[0]] for k in set(steps)}
        ladders["dp_sigma_min"] = {
            k: costs.sigmas[dp_path(costs, k, through_sigma_min=True)[0]] for k in set(steps)
        }
        out: dict[str, Any] = {"ladders": {}, "rmse": {}, "fit_cost": {}}
        if fid is not None:
            out["fid"] = {}
        for sched, by_k in ladders.items():
            out["ladders"][sched] = [np.asarray(by_k[k], np.float64).tolist() for k in steps]
            out["fit_cost"][sched] = [
                path_cost(costs, snap_to_candidates(by_k[k], costs)) for k in steps
            ]
            rmse, fids = [], []
            for k in steps:
                lad = np.asarray(by_k[k], np.float32)
                final = np.asarray(run(x_eval, lad, method=solver).samples[-1])
                rmse.append(float(np.sqrt(np.mean(np.square(final - teacher_eval)))))
                if fid is not None:
                    imgs = np.asarray(run(x_fid, lad, method=solver).samples[-1])
                    finite = np.all(np.isfinite(imgs))  # a diverged ladder gets no FID
                    fids.append(float(fid(np.clip(imgs, -1, 1))) if finite else float("nan"))
            out["rmse"][sched] = rmse
            if fid is not None:
                out["fid"][sched] = fids
        if fid is not None:
            out["fid_teacher"] = float(
                fid(
                    np.clip(
                        np.asarray(run(x_fid, teacher_sigmas, method="heun").samples[-1]), -1, 1
                    )
                )
            )
        if name == "model":
            out["denoiser_settles_at"] = denoiser_settles_at(teacher_fit, 0.01, schedule)
        result[name] = out
        logging.info("Schedules for %s: %s", name, out["rmse"])
    if plot and jax.process_index() == 0:
        out_dir = os.path.join(workdir, "geometry")
        os.makedirs(out_dir, exist_ok=True)
        _plot_schedules(result, os.path.join(out_dir, "schedules.png"))
    return result


def _plot_schedules(result: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure

    names = [n for n in ("model", "optimal") if n in result]
    if not names:
        return
    fig = Figure(figsize=(5.2 * len(names), 4))
    for a, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), a + 1)
        styles = (("edm_rho7", "-o"), ("uniform_t", "-s"), ("dp", "-^"), ("dp_sigma_min", "--v"))
        for sched, style in styles:
            ax.plot(result["nfe_used"], result[name]["rmse"][sched], style, ms=4, label=sched)
        ax.set_yscale("log")
        ax.set_xlabel(f"NFE ({result['solver']})")
        ax.set_ylabel("RMSE to the teacher's final samples")
        ax.set_title({"model": "trained model", "optimal": "optimal denoiser"}[name])
        ax.legend()
    fig.tight_layout()
    artifacts.save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# The geometry job


def run_geometry(
    config,
    workdir: str,
    *,
    params: Any = None,
    num_trajectories: int = 16,
    num_steps: int = 18,
    solvers: Sequence[str] = SOLVERS,
    chunk_size: int | None = DEFAULT_CHUNK,
    schedules_comparison: bool = False,
    comparison_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measures the ODE geometry on `config.data` and writes `<workdir>/geometry/`.

    Solves the PF-ODE (1) on EDM's ρ-ladder (`schedules.edm_sigmas(num_steps)`, σ from 80 to
    0.002, then 0) from `num_trajectories` noises σ_0·n, n drawn from `config.seed`, with

    * the optimal denoiser of the whole data set (`data.load_all`), and
    * the trained model, when `params` is given or `<workdir>/checkpoints` holds a
      checkpoint (its first EMA params), wrapped by `vp_model_as_denoiser` on the ladder
      snapped to its timestep grid (`snap_sigmas`).

    The measurements (quasi-linearity, convergence, curvature) use Heun's trajectories (EDM's
    sampler); the finite-difference identities are checked for every solver in `solvers`.
    With a model, `denoiser_settles_at` (1% threshold) is read off its Heun trajectory.
    With `schedules_comparison`, also runs `compare_schedules` (keyword overrides in
    `comparison_options`; slow: minutes on a CPU), puts its dict under `schedules`, replaces
    the model's `denoiser_settles_at` by the one measured on the fine teacher, and plots
    schedules.png.
    Writes summary.json (the returned dict) and chord_deviation.png, convergence.png,
    trajectories_pca.png, curvature.png, each atomically.

    Returns:
      The summary: per denoiser, JSON-able numbers (lists indexed like `sigmas`).
    """
    if not isinstance(num_trajectories, int) or num_trajectories < 1:
        raise ValueError(f"num_trajectories must be a positive integer, got {num_trajectories!r}.")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer ≥ 2, got {num_steps!r}.")
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown or "heun" not in solvers:
        raise ValueError(
            f"solvers must be a subset of {SOLVERS} that includes 'heun', got {tuple(solvers)}."
        )
    spec = data_lib.DataSpec.from_config(config.data)
    images = np.asarray(data_lib.load_all(spec), np.float32)  # [n, H, W, C]
    shape = images.shape[1:]
    sigmas = schedules.edm_sigmas(num_steps)
    key = jax.random.fold_in(jax.random.key(config.seed), _GEOMETRY_STREAM)
    noise = jax.random.normal(key, (num_trajectories, *shape), jnp.float32)
    out_dir = os.path.join(workdir, "geometry")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)

    summary: dict[str, Any] = {
        "dataset": spec.name,
        "image_shape": list(shape),
        "dimension": int(np.prod(shape)),
        "num_data": int(images.shape[0]),
        "num_trajectories": num_trajectories,
        "num_steps": num_steps,
        "seed": int(config.seed),
        "sigma_ladder": {
            "kind": "edm",
            "sigma_min": schedules.SIGMA_MIN,
            "sigma_max": schedules.SIGMA_MAX,
            "rho": schedules.RHO,
        },
        "data_nearest_neighbour_distance_median": float(
            np.median(_data_nn_distance(images, max_points=2000))
        ),
    }
    data_dev = jnp.asarray(images)

    @functools.partial(jax.jit, static_argnames="method")
    def optimal_solve(x_init, data, method):
        denoise = functools.partial(optimal_denoiser, data=data, chunk_size=chunk_size)
        return solve(denoise, x_init, sigmas, method)

    trajectories = {m: optimal_solve(noise * float(sigmas[0]), data_dev, method=m) for m in solvers}
    results = {"optimal": _analyse(trajectories, images)}

    model_params, checkpoint_step = _model_params(config, workdir, params)
    if model_params is not None:
        from ddpm_bs import train  # lazily: only this optional part needs the model builder

        model = train.build_model(config)
        schedule = schedules.get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
        model_sigmas = snap_sigmas(sigmas, schedule)
        num_classes = config.model.num_classes
        labels = (
            jnp.arange(num_trajectories, dtype=jnp.int32) % num_classes if num_classes else None
        )

        @functools.partial(jax.jit, static_argnames="method")
        def model_solve(params, x_init, method):
            def model_fn(x_vp, t):
                return model.apply({"params": params}, x_vp, t, labels, train=False)

            denoise = vp_model_as_denoiser(
                model_fn, schedule, config.loss.target, config.model.learn_sigma
            )
            return solve(denoise, x_init, model_sigmas, method)

        model_traj = {
            m: model_solve(model_params, noise * float(model_sigmas[0]), method=m) for m in solvers
        }
        results["model"] = _analyse(model_traj, images)
        results["model"]["checkpoint_step"] = checkpoint_step
        results["model"]["sigma_grid"] = (
            "ladder snapped to the model's timesteps, duplicates merged"
        )
        results["model"]["denoiser_settles_at"] = denoiser_settles_at(
            jax.device_get(model_traj["heun"]), 0.01, schedule
        )

    if schedules_comparison:
        comparison = compare_schedules(
            config, workdir, params=model_params, **(comparison_options or {})
        )
        if "model" in comparison and "model" in results:
            results["model"]["denoiser_settles_at"] = comparison["model"]["denoiser_settles_at"]
        results["schedules"] = comparison
    summary.update(results)
    if jax.process_index() == 0:  # every process computes the same numbers; one writes them
        artifacts.write_json(summary, os.path.join(out_dir, "summary.json"))
        heun = {"optimal": trajectories["heun"]}
        if model_params is not None:
            heun["model"] = model_traj["heun"]
        _plot_all(heun, out_dir)
        logging.info("Wrote the geometry summary and plots to %s", out_dir)
    return summary


def _data_nn_distance(images: np.ndarray, max_points: int) -> np.ndarray:
    """Distance of each of the first `max_points` data points to its nearest other point."""
    y = _flat(images[:max_points], 1)
    dist = np.sum(y * y, 1)[:, None] - 2.0 * y @ y.T + np.sum(y * y, 1)[None, :]
    np.fill_diagonal(dist, np.inf)
    return np.sqrt(np.maximum(dist.min(axis=1), 0.0))


def _model_params(config, workdir: str, params: Any) -> tuple[Any, int | None]:
    if params is not None:
        return params, None
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None, None
    from ddpm_bs import checkpointing, train  # lazily: restoring needs the TrainState layout

    ckpt = checkpointing.Checkpoints(workdir, asynchronous=False)
    try:
        if ckpt.latest_step() is None:
            return None, None
        state, _ = ckpt.restore(train.Trainer(config).abstract_state)
    finally:
        ckpt.close()
    return state.ema_params[0], int(state.step)


def _analyse(trajectories: dict[str, Trajectory], images: np.ndarray) -> dict[str, Any]:
    """JSON-able measurements of one denoiser's trajectories (Heun's for the geometry)."""
    traj = jax.device_get(trajectories["heun"])
    lin = quasi_linearity(traj.samples)
    conv = convergence(traj)
    curv = curvature(traj, "heun")
    nearest = nearest_data_distance(np.asarray(traj.samples[-1]), images)
    return {
        "sigmas": np.asarray(traj.sigmas, np.float64).tolist(),
        "quasi_linearity": {
            "max_relative_deviation_mean": float(lin["max_relative_deviation"].mean()),
            "max_relative_deviation_max": float(lin["max_relative_deviation"].max()),
            "mean_relative_deviation_mean": float(lin["mean_relative_deviation"].mean()),
            "chord_length_mean": float(lin["chord_length"].mean()),
            "relative_deviation_per_sigma": lin["relative_deviation"].mean(axis=1).tolist(),
            "deviation_per_sigma": lin["deviation"].mean(axis=1).tolist(),
            "deviation_over_remaining_per_sigma": lin["deviation_over_remaining"]
            .mean(axis=1)
            .tolist(),
            "pca_explained_variance_mean": lin["pca_explained_variance"].mean(axis=0).tolist(),
        },
        "convergence": {
            "sample_to_final_per_sigma": conv["sample_to_final"].mean(axis=1).tolist(),
            "denoised_to_final_per_sigma": conv["denoised_to_final"].mean(axis=1).tolist(),
            "denoised_over_sample_ratio_per_sigma": conv["ratio"].tolist(),
        },
        "curvature": {
            "mean_turn_angle_deg_per_point": curv["mean_turn_angle_deg"].tolist(),
            "pearson_turn_vs_relative_denoised_change": curv["pearson"],
            "spearman_turn_vs_relative_denoised_change": curv["spearman"],
            "identity_max_error_deg": curv["identity_max_error_deg"],
            "raw_denoised_max_error_deg": curv["raw_denoised_max_error_deg"],
        },
        "finite_differences": {
            m: finite_difference_check(jax.device_get(t), m) for m, t in trajectories.items()
        },
        "final_samples": {  # the optimal denoiser can only reproduce training points
            "nearest_data_distance_median": float(np.median(nearest)),
            "nearest_data_distance_max": float(nearest.max()),
        },
    }


# --------------------------------------------------------------------------------------------
# Output


def _plot_all(heun: dict[str, Trajectory], out_dir: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    colors = {"optimal": "tab:blue", "model": "tab:orange"}
    labels = {"optimal": "optimal denoiser", "model": "trained model"}

    # 1. Deviation from the chord vs σ.
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, traj in heun.items():
        sig = np.asarray(traj.sigmas)[:-1]
        rel = quasi_linearity(jax.device_get(traj.samples))["relative_deviation"][:-1]
        ax.plot(
            sig, rel.mean(axis=1), "-o", ms=3, color=colors[name], label=f"{labels[name]} (mean)"
        )
        ax.fill_between(sig, rel.min(axis=1), rel.max(axis=1), color=colors[name], alpha=0.2)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("σ (sampling runs right)")
    ax.set_ylabel("‖x_σ − chord‖ / chord length")
    ax.set_title("Quasi-linear sampling trajectories")
    ax.legend()
    fig.tight_layout()
    artifacts.save_figure(fig, os.path.join(out_dir, "chord_deviation.png"))

    # 2. Distance to the final sample vs σ.
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, traj in heun.items():
        sig = np.asarray(traj.sigmas)[:-1]
        conv = convergence(jax.device_get(traj))
        ax.plot(
            sig,
            conv["sample_to_final"][:-1].mean(axis=1),
            "-o",
            ms=3,
            color=colors[name],
            label=f"{labels[name]}: x_σ",
        )
        ax.plot(
            sig,
            conv["denoised_to_final"].mean(axis=1),
            "--s",
            ms=3,
            color=colors[name],
            label=f"{labels[name]}: D(x_σ; σ)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("σ (sampling runs right)")
    ax.set_ylabel("distance to the final sample")
    ax.set_title("The denoising trajectory converges first")
    ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, os.path.join(out_dir, "convergence.png"))

    # 3. 2-D PCA projection of a few trajectories.
    traj = jax.device_get(next(iter(heun.values())))
    name = next(iter(heun))
    num = min(4, traj.samples.shape[1])
    fig = Figure(figsize=(3.2 * num, 3.4))
    for b in range(num):
        ax = fig.add_subplot(1, num, b + 1)
        x = _flat(traj.samples[:, b], 1)
        d = _flat(traj.denoised[:, b], 1)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        basis = vt[:2].T if vt.shape[0] >= 2 else np.eye(x.shape[1])[:, :2]
        px, pd = (x - mean) @ basis, (d - mean) @ basis
        ax.plot(px[:, 0], px[:, 1], "-o", ms=3, color=colors[name], label="x_σ")
        ax.plot(pd[:, 0], pd[:, 1], "--s", ms=3, color="tab:green", label="D(x_σ; σ)")
        ax.plot(px[0, 0], px[0, 1], "k^", label="σ_max")
        ax.plot(px[-1, 0], px[-1, 1], "r*", ms=10, label="final")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(f"trajectory {b}", fontsize=9)
        if b == 0:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{labels[name]}: trajectories on their top-2 principal directions (axes not to scale)",
        fontsize=10,
    )
    fig.tight_layout()
    artifacts.save_figure(fig, os.path.join(out_dir, "trajectories_pca.png"))

    # 4. Turn of the sampling trajectory vs change of the denoising output.
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    for name, traj in heun.items():
        curv = curvature(jax.device_get(traj), "heun")
        ax.scatter(
            curv["relative_denoised_change"].ravel(),
            curv["turn_angle_deg"].ravel(),
            s=6,
            color=colors[name],
            label=f"{labels[name]} (Spearman {curv['spearman']:.2f})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("‖D_i − D_{i−1}‖ / ‖x_i − D_i‖")
    ax.set_ylabel("turn angle of x_σ at step i (degrees)")
    ax.set_title("Curvature follows the denoising trajectory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, os.path.join(out_dir, "curvature.png"))
