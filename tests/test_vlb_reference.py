"""The hybrid loss's VLB term for t > 0 against the closed-form KL of two Gaussians, in bits.

improved-DDPM (Nichol & Dhariwal 2021): L_t = KL(q(x_{t−1}|x_t, x0) ‖ p_θ(x_{t−1}|x_t)), with
q's mean and variance from DDPM Eqs. 6-7, p_θ's mean from the ε-prediction and its log-variance
v·log β_t + (1−v)·log β̃_t (Eq. 15), averaged over dimensions, in bits, and scaled by T/1000 in
the hybrid loss L_simple + λ L_vlb. Everything below is written out in float64 numpy.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_bs import losses, schedules


def linear_betas(num_timesteps):
    scale = 1000 / num_timesteps  # DDPM's linear schedule, improved-DDPM's scaling for any T
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)


def gaussian_kl_bits(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per example: mean over dims, in bits."""
    kl = 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + np.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * np.exp(-logvar2)
    )
    return kl.reshape(kl.shape[0], -1).mean(axis=1) / np.log(2.0)


def reference_vb(num_timesteps, x0, noise, eps_hat, v_raw, t):
    betas = linear_betas(num_timesteps)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    b, a, ap = (arr[t][:, None, None, None] for arr in (betas, ab, ab_prev))
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    c1, c2 = b * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(1 - b) / (1 - a)
    posterior_var = b * (1 - ap) / (1 - a)  # β̃_t (t > 0)
    true_mean, true_logvar = c1 * x0 + c2 * xt, np.log(posterior_var)
    x0_hat = (xt - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    model_mean = c1 * x0_hat + c2 * xt
    frac = (v_raw + 1) / 2
    model_logvar = frac * np.log(b) + (1 - frac) * np.log(posterior_var)
    kl = gaussian_kl_bits(true_mean, true_logvar, model_mean, model_logvar)
    return xt, kl * num_timesteps / 1000


@pytest.mark.parametrize("num_timesteps", [1000, 250])
def test_hybrid_vb_term_is_the_kl_of_posterior_to_model_in_bits(num_timesteps):
    rng = np.random.default_rng(3)
    t = np.array([1, 2, 10, num_timesteps // 4, num_timesteps // 2, num_timesteps - 1])
    shape = (len(t), 4, 4, 3)
    x0 = rng.uniform(-1, 1, shape)
    noise = rng.standard_normal(shape)
    eps_hat = noise + 0.3 * rng.standard_normal(shape)  # an imperfect mean
    v_raw = rng.uniform(-1, 1, shape)  # learned σ anywhere between β̃_t and β_t
    xt, expected = reference_vb(num_timesteps, x0, noise, eps_hat, v_raw, t)

    np.testing.assert_allclose(
        schedules.betas64("linear", num_timesteps), linear_betas(num_timesteps)
    )
    schedule = schedules.get_schedule("linear", num_timesteps)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    output = np.concatenate([eps_hat, v_raw], axis=-1)
    terms = losses.per_example_loss(
        losses.LossSpec(learn_sigma=True),
        schedule,
        f32(output),
        f32(x0),
        f32(xt),
        jnp.asarray(t, jnp.int32),
        f32(noise),
    )
    assert np.all(expected > 1e-4)  # neither distribution is the other
    # float32 constants and inputs: ~1e-6 relative, more where the KL is a small difference
    np.testing.assert_allclose(terms["vb"], expected, rtol=2e-3)
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)


def test_the_reference_tells_the_kl_from_its_reverse_and_from_nats():
    rng = np.random.default_rng(4)
    m1, m2 = rng.standard_normal((2, 3, 5))
    lv1, lv2 = np.log(rng.uniform(0.01, 0.1, (2, 3, 5)))
    forward = gaussian_kl_bits(m1, lv1, m2, lv2)
    # the two arguments' roles differ: KL(q‖p) ≠ KL(p‖q) beyond the test's tolerance
    assert np.all(np.abs(gaussian_kl_bits(m2, lv2, m1, lv1) / forward - 1) > 0.05)
    # and a variance-only KL in bits: for equal means, ½(r − 1 − ln r)/ln 2 with r = σ1²/σ2²
    r = np.exp(lv1 - lv2)
    same = gaussian_kl_bits(m1, lv1, m1, lv2)
    np.testing.assert_allclose(same, (0.5 * (r - 1 - np.log(r))).mean(axis=1) / np.log(2))
