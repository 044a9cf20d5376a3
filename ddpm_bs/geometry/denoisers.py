"""Denoisers D(x; σ) of the VE probability-flow ODE: optimal (mean shift), Gaussian, trained model.

A VE state at noise level σ is x = y + σ·n with y a data point and n ~ N(0, I); a denoiser
maps (x [B, ...], σ [B]) to an estimate of E[y | x], [B, ...] (`Denoiser`). For data uniform on
a finite set {y_k}, D is a softmax-weighted average of the y_k with logits −‖x − y_k‖²/(2σ²):
one Gaussian-kernel mean-shift iteration with bandwidth σ (Chen et al., "A Geometric
Perspective on Diffusion Models", arXiv:2305.19947: "optimal ODE-based sampling and mean
shift"). A trained discrete-time VP network becomes a VE denoiser through
`vp_model_as_denoiser`; `model_params` and `model_denoiser` get it from a config and a workdir.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_bs import checkpointing, diffusion, schedules, state

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], sigma [B]) -> D [B, ...]

DEFAULT_CHUNK = 1024
_HIGHEST = jax.lax.Precision.HIGHEST  # keep the ‖x‖² − 2x·y + ‖y‖² expansion out of TF32


def _check_sigma(sigma: Any, batch: int) -> jax.Array:
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != batch):
        raise ValueError(
            f"sigma must be a scalar or have shape [B] = [{batch}], got shape {sigma.shape}."
        )
    if not isinstance(sigma, jax.core.Tracer) and not np.all(np.asarray(sigma) > 0):
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


def model_denoiser(config: Any, params: Any, labels: jax.Array | None = None) -> Denoiser:
    """The network of `config` with `params` as a VE denoiser (`vp_model_as_denoiser`).

    Args:
      config: the training config (model, diffusion schedule, loss target).
      params: the network's parameters (e.g. `model_params`' EMA params).
      labels: [B] int32 class labels for a class-conditional model, else None.
    """
    model = state.build_model(config)
    schedule = schedules.get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)

    def model_fn(x_vp, t):
        return model.apply({"params": params}, x_vp, t, labels, train=False)

    return vp_model_as_denoiser(model_fn, schedule, config.loss.target, config.model.learn_sigma)


def model_params(config: Any, workdir: str, params: Any = None) -> tuple[Any, int | None]:
    """(params, checkpoint step) of the model to measure.

    `params` itself (step None) when given; else the first EMA params of the latest checkpoint
    in `<workdir>/checkpoints` (local or remote); (None, None) when there is none.
    """
    if params is not None:
        return params, None
    if not (epath.Path(workdir) / "checkpoints").is_dir():
        return None, None
    ckpt = checkpointing.Checkpoints(workdir, asynchronous=False)
    try:
        if ckpt.latest_step() is None:
            return None, None
        restored, _ = ckpt.restore(state.abstract_state_of(config, workdir))
    finally:
        ckpt.close()
    return restored.ema_params[0], int(restored.step)
