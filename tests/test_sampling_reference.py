"""Ancestral (DDPM) and DDIM sampling against exact linear-Gaussian recursions.

For data x0 ~ N(m, s²) per pixel, x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε is N(√ᾱ_t m, ᾱ_t s² + 1 − ᾱ_t),
and the exact ε-model is the posterior mean E[ε | x_t] = k_t (x_t − √ᾱ_t m) with
k_t = √(1−ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t). Every step of DDPM (Ho et al. 2020, Eqs. 6-7, Algorithm 2)
and DDIM (Song et al. 2021, Eq. 12) is then x ← A x + B + σ z, so the samples are Gaussian with
a mean and variance that a scalar recursion in float64 gives exactly, from x_T ~ N(0, 1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_bs import sampling, schedules

T, M, S = 1000, 0.3, 0.2
BETAS = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)  # DDPM's linear schedule
ALPHA_BAR = np.cumprod(1.0 - BETAS)
SHAPE = (2048, 8, 8, 1)  # 131,072 independent pixels


def exact_eps(x, t):
    """E[ε | x_t] for x0 ~ N(M, S²), elementwise; t: [B] original timesteps."""
    a = jnp.asarray(ALPHA_BAR, jnp.float32)[t][:, None, None, None]
    return jnp.sqrt(1 - a) / (a * S**2 + 1 - a) * (x - jnp.sqrt(a) * M)


def reference_moments(kept, method, eta=0.0):
    """Mean and variance of the sampler's output, by the scalar recursion (float64)."""
    ab = ALPHA_BAR[np.asarray(kept)]
    mean, var = 0.0, 1.0
    for i in range(len(kept) - 1, -1, -1):
        a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
        k = np.sqrt(1 - a) / (a * S**2 + 1 - a)
        # x̂0 = (x − √(1−ᾱ) ε̂)/√ᾱ = A0 x + B0
        a0, b0 = (1 - np.sqrt(1 - a) * k) / np.sqrt(a), np.sqrt(1 - a) * k * M
        if method == "ddpm":  # posterior mean of q(x_{t−1} | x_t, x̂0), variance β̃ (Eqs. 6-7)
            beta = 1 - a / a_prev  # the respaced β
            c1 = beta * np.sqrt(a_prev) / (1 - a)
            c2 = (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
            coef, const = c1 * a0 + c2, c1 * b0
            noise_var = beta * (1 - a_prev) / (1 - a) if i > 0 else 0.0
        else:  # DDIM Eq. 12 with σ_t(η) (Eq. 16)
            sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
            direction = np.sqrt(1 - a_prev - sigma**2)
            coef = np.sqrt(a_prev) * a0 + direction * k
            const = np.sqrt(a_prev) * b0 - direction * k * np.sqrt(a) * M
            noise_var = sigma**2 if i > 0 else 0.0
        mean, var = coef * mean + const, coef**2 * var + noise_var
    return mean, var


CASES = {  # (method, steps, options); 1000 steps on fewer pixels: its moments differ the most
    "ddpm, all 1000 steps": ("ddpm", None, {}),
    "ddpm, respaced to 50": ("ddpm", 50, {}),
    "ddim eta=0": ("ddim", 50, {"eta": 0.0}),
    "ddim eta=0.5": ("ddim", 50, {"eta": 0.5}),
    "ddim eta=1": ("ddim", 50, {"eta": 1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gaussian_data_with_the_exact_model_gives_the_recursion_moments(case):
    method, steps, opts = CASES[case]
    shape = SHAPE if steps else (512, *SHAPE[1:])
    n = int(np.prod(shape))
    kept = list(range(T)) if steps is None else sampling.space_timesteps(T, steps)
    mean, var = reference_moments(kept, method, **opts)
    fn = jax.jit(
        lambda key: sampling.sample(
            method,
            exact_eps,
            schedules.get_schedule("linear", T),
            shape,
            key,
            steps=steps or T,
            clip_denoised=False,
            **opts,
        )
    )
    x = np.asarray(fn(jax.random.key(7)), np.float64).ravel()
    # Standard errors of n Gaussian draws: √(v/n) for the mean, v·√(2/n) for the variance
    # (0.4 % of v at 131,072 pixels); 4.5 of them leave a chance below 1e-5 of a false
    # failure per check, while the variance ablations move it by 3.7 % (η = 0 vs 0.5) to
    # 97 % (σ² for σ).
    assert abs(x.mean() - mean) < 4.5 * np.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() - var) < 4.5 * var * np.sqrt(2 / n), (x.var(), var)


def test_the_recursion_tells_the_samplers_apart():
    """The cases above differ by more than the tolerance (so each test could fail)."""
    sp = sampling.space_timesteps(T, 50)
    var = {eta: reference_moments(sp, "ddim", eta=eta)[1] for eta in (0.0, 0.5, 1.0)}
    tolerance = 4.5 * np.sqrt(2 / np.prod(SHAPE))
    assert abs(var[0.5] / var[0.0] - 1) > 2 * tolerance
    assert abs(var[1.0] / var[0.5] - 1) > 2 * tolerance
    # DDIM with η = 1 is DDPM's ancestral step with variance β̃ on the same grid.
    np.testing.assert_allclose(var[1.0], reference_moments(sp, "ddpm")[1], rtol=1e-10)
    full = reference_moments(list(range(T)), "ddpm")[1]
    assert abs(full / reference_moments(sp, "ddpm")[1] - 1) > 8 * tolerance  # on ¼ the pixels
