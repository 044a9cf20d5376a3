"""Diffusion math against DDPM / improved-DDPM formulas written out in float64 numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_bs import diffusion, schedules

T = 1000


def _np_schedule(name):
    """ᾱ, β in float64, written out from the papers independently of the module."""
    if name == "linear":
        betas = np.linspace(1e-4, 0.02, T)
    else:
        u = np.arange(T + 1) / T
        f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return betas, np.cumprod(1 - betas)


@pytest.mark.parametrize("t_value", [0, 300, 999])
def test_q_sample_moments_match_ddpm_eq4(t_value):
    # x_t | x0 ~ N(√ᾱ x0, 1−ᾱ). With n = 200k draws the sample mean has standard error
    # √((1−ᾱ)/n) and the sample variance (1−ᾱ)√(2/n); 5 standard errors fail with p < 1e-6.
    s = schedules.get_schedule("linear", T)
    n = 200_000
    x0 = jnp.full((n, 1, 1, 1), 0.7, jnp.float32)
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.full((n,), t_value, jnp.int32)
    xt = np.asarray(diffusion.q_sample(s, x0, t, noise), np.float64).ravel()
    _, ac = _np_schedule("linear")
    mean, var = math.sqrt(ac[t_value]) * 0.7, 1 - ac[t_value]
    assert abs(xt.mean() - mean) < 5 * math.sqrt(var / n)
    assert abs(xt.var() - var) < 5 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_mean_variance_match_ddpm_eqs_6_7(name):
    s = schedules.get_schedule(name, T)
    betas, ac = _np_schedule(name)
    ac_prev = np.append(1.0, ac[:-1])
    rng = np.random.default_rng(0)
    t = np.array([0, 1, 17, 500, 998, 999])
    x0 = rng.normal(size=(6, 4, 4, 3))
    xt = rng.normal(size=(6, 4, 4, 3))
    mean, var, log_var = diffusion.q_posterior_mean_variance(
        s, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t)
    )
    b = lambda a: a[t][:, None, None, None]  # noqa: E731
    want_mean = (
        b(np.sqrt(ac_prev) * betas / (1 - ac)) * x0
        + b(np.sqrt(1 - betas) * (1 - ac_prev) / (1 - ac)) * xt
    )
    want_var = (1 - ac_prev) / (1 - ac) * betas
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var[:, 0, 0, 0], want_var[t], rtol=1e-4, atol=1e-12)
    want_log = np.log(np.append(want_var[1], want_var[1:]))
    np.testing.assert_allclose(log_var[:, 0, 0, 0], want_log[t], rtol=1e-4)
    assert var[0, 0, 0, 0] == 0.0  # β̃ at the first step is exactly zero; the log is clipped.


def test_parameterisations_round_trip():
    s = schedules.get_schedule("cosine", T)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (8, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 5, 100, 300, 500, 700, 900, 990])
    xt = diffusion.q_sample(s, x0, t, eps)
    v = diffusion.v_from_x0_eps(s, x0, eps, t)
    tol = dict(rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(diffusion.predict_eps_from_v(s, xt, t, v), eps, **tol)
    np.testing.assert_allclose(diffusion.predict_x0_from_v(s, xt, t, v), x0, **tol)
    # x0 from ε is ill-conditioned where ᾱ → 0, and ε from x0 where ᾱ → 1; check each where it is not.
    np.testing.assert_allclose(diffusion.predict_x0_from_eps(s, xt, t, eps)[:5], x0[:5], **tol)
    np.testing.assert_allclose(diffusion.predict_eps_from_x0(s, xt, t, x0)[2:], eps[2:], **tol)
    for target in diffusion.TARGETS:
        out = diffusion.target_of(target, s, x0, eps, t)
        x0_hat, eps_hat = diffusion.x0_and_eps_from_output(target, s, xt, t, out)
        np.testing.assert_allclose(x0_hat[:5], x0[:5], **tol)
        np.testing.assert_allclose(eps_hat[2:], eps[2:], **tol)


def test_learned_variance_interpolates_between_posterior_and_beta():
    s = schedules.get_schedule("linear", T)
    t = jnp.array([0, 10, 999])
    lo = diffusion.learned_log_variance(s, -jnp.ones((3, 2, 2, 1)), t)
    hi = diffusion.learned_log_variance(s, jnp.ones((3, 2, 2, 1)), t)
    mid = diffusion.learned_log_variance(s, jnp.zeros((3, 2, 2, 1)), t)
    np.testing.assert_allclose(lo[:, 0, 0, 0], s.posterior_log_variance_clipped[t], rtol=1e-6)
    np.testing.assert_allclose(hi[:, 0, 0, 0], np.log(s.betas[t]), rtol=1e-6)
    np.testing.assert_allclose(mid, (lo + hi) / 2, rtol=1e-6)


def test_normal_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    s1, s2 = rng.uniform(0.1, 2, 10), rng.uniform(0.1, 2, 10)
    want = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = diffusion.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_discretized_gaussian_log_likelihood_matches_exact_bin_masses():
    # The tanh approximation of Φ is within 1.8e-4 of the exact CDF, so bin masses agree to 4e-4.
    x = np.linspace(-1, 1, 256)
    means = np.full_like(x, 0.1)
    log_scales = np.full_like(x, np.log(0.3))
    got = np.exp(np.asarray(diffusion.discretized_gaussian_log_likelihood(x, means, log_scales)))
    cdf = lambda v: stats.norm.cdf(v, loc=0.1, scale=0.3)  # noqa: E731
    upper = np.where(x > 0.999, 1.0, cdf(x + 1 / 255))
    lower = np.where(x < -0.999, 0.0, cdf(x - 1 / 255))
    np.testing.assert_allclose(got, upper - lower, atol=4e-4)
    np.testing.assert_allclose(got.sum(), 1.0, atol=1e-3)


def test_vb_terms_are_zero_at_the_true_posterior_and_nll_at_t0():
    s = schedules.get_schedule("linear", T)
    k1, k2 = jax.random.split(jax.random.key(3))
    x0 = jnp.round(jax.random.uniform(k1, (4, 4, 4, 3), minval=-1, maxval=1) * 127.5) / 127.5
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 500, 999])
    xt = diffusion.q_sample(s, x0, t, eps)
    mean, _, log_var = diffusion.q_posterior_mean_variance(s, x0, xt, t)
    vb = diffusion.vb_terms_bpd(s, mean, log_var, x0, xt, t)
    np.testing.assert_allclose(vb[1:], 0.0, atol=1e-5)
    nll = -diffusion.discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    np.testing.assert_allclose(vb[0], nll[0].mean() / math.log(2), rtol=1e-5)


def test_p_mean_variance_with_true_eps_recovers_posterior():
    s = schedules.get_schedule("linear", T)
    k1, k2 = jax.random.split(jax.random.key(4))
    x0 = jax.random.uniform(k1, (3, 4, 4, 3), minval=-0.9, maxval=0.9)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([3, 50, 200])
    xt = diffusion.q_sample(s, x0, t, eps)
    out = diffusion.p_mean_variance(s, eps, xt, t, target="eps", clip_denoised=False)
    want, _, want_log = diffusion.q_posterior_mean_variance(s, x0, xt, t)
    np.testing.assert_allclose(out["mean"], want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out["log_variance"], want_log, rtol=1e-6)
    out_large = diffusion.p_mean_variance(
        s, eps, xt, t, fixed_variance="large", clip_denoised=False
    )
    np.testing.assert_allclose(out_large["log_variance"][:, 0, 0, 0], np.log(s.betas[t]), rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda s: diffusion.q_sample(
                s, jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), jnp.zeros((3, 4))
            ),
            "noise",
        ),
        (
            lambda s: diffusion.q_sample(
                s, jnp.zeros((2, 4)), jnp.zeros(3, jnp.int32), jnp.zeros((2, 4))
            ),
            "t must have shape",
        ),
        (lambda s: diffusion.target_of("score", s, None, None, None), "target 'score'.*eps, x0, v"),
        (lambda s: diffusion.split_learned_sigma(jnp.zeros((1, 2, 2, 5)), 3), "2×3 channels"),
        (
            lambda s: diffusion.fixed_log_variance(s, "medium", jnp.zeros(1, jnp.int32), 4),
            "small, large",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(schedules.get_schedule("linear", T))
