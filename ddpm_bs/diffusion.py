"""Gaussian diffusion in functional form over a `schedules.Schedule`.

The formulas are DDPM's (Ho et al. 2020, Eqs. 4, 6, 7) and improved-DDPM's
(Nichol & Dhariwal 2021, Eqs. 13-15 and the hybrid VLB). Arrays are NHWC with a
leading batch axis: `x: [B, ...]`, `t: [B]` int32 0-based timestep indices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ddpm_bs import schedules

TARGETS = ("eps", "x0", "v")


def extract(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """values[t] shaped [B, 1, …, 1] to broadcast against an array of rank `ndim`."""
    out = jnp.take(values, t, axis=0)
    return out.reshape(t.shape + (1,) * (ndim - t.ndim))


def q_mean_variance(schedule: schedules.Schedule, x0: jax.Array, t: jax.Array):
    """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x0, (1−ᾱ_t) I) (DDPM Eq. 4)."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    var = extract(1.0 - schedule.alphas_cumprod, t, x0.ndim)
    log_var = jnp.log(var)
    return mean, jnp.broadcast_to(var, x0.shape), jnp.broadcast_to(log_var, x0.shape)


def q_sample(
    schedule: schedules.Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """Draws x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM Eq. 4). x0, noise: [B, ...]; t: [B]."""
    if x0.shape != noise.shape:
        raise ValueError(
            f"x0 and noise must have the same shape, got {x0.shape} and {noise.shape}."
        )
    _check_t(t, x0)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def q_posterior_mean_variance(
    schedule: schedules.Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0) (DDPM Eqs. 6-7).

    μ̃_t = β_t √ᾱ_{t−1}/(1−ᾱ_t) · x0 + (1−ᾱ_{t−1}) √α_t/(1−ᾱ_t) · x_t,  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t.
    """
    if x0.shape != xt.shape:
        raise ValueError(f"x0 and xt must have the same shape, got {x0.shape} and {xt.shape}.")
    _check_t(t, x0)
    mean = (
        extract(schedule.posterior_mean_coef1, t, xt.ndim) * x0
        + extract(schedule.posterior_mean_coef2, t, xt.ndim) * xt
    )
    var = jnp.broadcast_to(extract(schedule.posterior_variance, t, xt.ndim), xt.shape)
    log_var = jnp.broadcast_to(
        extract(schedule.posterior_log_variance_clipped, t, xt.ndim), xt.shape
    )
    return mean, var, log_var


# --- Conversions between the ε, x0 and v parameterisations -----------------------------------


def predict_x0_from_eps(schedule, xt, t, eps):
    """x0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps
    )


def predict_eps_from_x0(schedule, xt, t, x0):
    """ε = (x_t − √ᾱ_t x0)/√(1−ᾱ_t)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, xt.ndim
    )


def v_from_x0_eps(schedule, x0, eps, t):
    """v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def predict_x0_from_v(schedule, xt, t, v):
    """x0 = √ᾱ_t x_t − √(1−ᾱ_t) v."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * xt
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v
    )


def predict_eps_from_v(schedule, xt, t, v):
    """ε = √(1−ᾱ_t) x_t + √ᾱ_t v."""
    return (
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt
        + extract(schedule.sqrt_alphas_cumprod, t, xt.ndim) * v
    )


def target_of(target: str, schedule, x0, eps, t):
    """The regression target for the parameterisation `target` ∈ {'eps', 'x0', 'v'}."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        return v_from_x0_eps(schedule, x0, eps, t)
    raise ValueError(f"target {target!r} is unknown; valid targets: {', '.join(TARGETS)}.")


def x0_and_eps_from_output(target: str, schedule, xt, t, output):
    """Returns (x0, ε) implied by a model output in the parameterisation `target`."""
    if target == "eps":
        return predict_x0_from_eps(schedule, xt, t, output), output
    if target == "x0":
        return output, predict_eps_from_x0(schedule, xt, t, output)
    if target == "v":
        return predict_x0_from_v(schedule, xt, t, output), predict_eps_from_v(
            schedule, xt, t, output
        )
    raise ValueError(f"target {target!r} is unknown; valid targets: {', '.join(TARGETS)}.")


# --- Learned variance (improved-DDPM §3.1) -----------------------------------------------------


def split_learned_sigma(output: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
    """Splits a [B, H, W, 2C] model output into the mean output and the variance values."""
    if output.shape[-1] != 2 * channels:
        raise ValueError(
            f"a learned-sigma model must output 2×{channels} channels, got {output.shape[-1]}."
        )
    return output[..., :channels], output[..., channels:]


def learned_log_variance(schedule, var_values: jax.Array, t: jax.Array) -> jax.Array:
    """log Σ = v log β_t + (1−v) log β̃_t with v = (output+1)/2 (improved-DDPM Eq. 15)."""
    min_log = extract(schedule.posterior_log_variance_clipped, t, var_values.ndim)
    max_log = extract(schedule.log_betas, t, var_values.ndim)
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def fixed_log_variance(schedule, kind: str, t: jax.Array, ndim: int) -> jax.Array:
    """DDPM's fixed variances: 'small' = β̃_t (clipped), 'large' = β_t (with β̃_1 at t=0)."""
    if kind == "small":
        return extract(schedule.posterior_log_variance_clipped, t, ndim)
    if kind == "large":
        log_large = jnp.concatenate(
            [schedule.posterior_log_variance_clipped[1:2], schedule.log_betas[1:]]
        )
        return extract(log_large, t, ndim)
    raise ValueError(f"variance kind {kind!r} is unknown; valid kinds: small, large.")


def p_mean_variance(
    schedule,
    output: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    *,
    target: str = "eps",
    learn_sigma: bool = False,
    fixed_variance: str = "small",
    clip_denoised: bool = True,
):
    """The reverse step p(x_{t−1} | x_t) implied by a model output.

    Returns a dict with 'mean', 'log_variance', 'pred_x0' and 'pred_eps', each [B, ...].
    """
    if learn_sigma:
        output, var_values = split_learned_sigma(output, xt.shape[-1])
        log_var = learned_log_variance(schedule, var_values, t)
    else:
        log_var = jnp.broadcast_to(
            fixed_log_variance(schedule, fixed_variance, t, xt.ndim), xt.shape
        )
    x0, eps = x0_and_eps_from_output(target, schedule, xt, t, output)
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(schedule, x0, xt, t)
    return {"mean": mean, "log_variance": log_var, "pred_x0": x0, "pred_eps": eps}


# --- VLB terms (improved-DDPM's hybrid loss) ---------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Φ(x) by the tanh approximation the DDPM codebases use (absolute error below 1.8e-4)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of images x ∈ [−1, 1] quantised to 256 bins under N(means, e^{2 log_scales}).

    The edge bins extend to ±∞ (DDPM §3.3). Elementwise, in nats.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )


def vb_terms_bpd(schedule, model_mean, model_log_variance, x0, xt, t):
    """The VLB term L_t per example in bits per dimension.

    L_t = KL(q(x_{t−1}|x_t,x0) ‖ p(x_{t−1}|x_t)) for t > 0 and the decoder NLL −log p(x0|x1) at t = 0.
    Returns [B].
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, xt, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_variance)) / math.log(
        2.0
    )
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    nll = _mean_flat(nll) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def _mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _check_t(t, x):
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape [B] = ({x.shape[0]},), got {t.shape}.")
