"""Schedules against their closed forms, written out in float64 numpy."""

import math

import numpy as np
import pytest

from ddpm_bs import schedules


@pytest.mark.parametrize("num_timesteps", [1000, 4000, 50])
def test_linear_betas_match_ddpm_scaled_by_1000_over_t(num_timesteps):
    s = schedules.get_schedule("linear", num_timesteps)
    scale = 1000 / num_timesteps
    assert s.betas.dtype == np.float32
    np.testing.assert_allclose(s.betas[0], 1e-4 * scale, rtol=1e-6)
    np.testing.assert_allclose(s.betas[-1], 0.02 * scale, rtol=1e-6)
    mid = num_timesteps // 2
    expected_mid = 1e-4 * scale + mid / (num_timesteps - 1) * (0.02 - 1e-4) * scale
    np.testing.assert_allclose(s.betas[mid], expected_mid, rtol=1e-6)
    np.testing.assert_allclose(
        s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, num_timesteps) * scale), rtol=1e-5
    )


@pytest.mark.parametrize("num_timesteps", [1000, 4000])
def test_cosine_alphas_cumprod_match_improved_ddpm_closed_form(num_timesteps):
    s_ = 0.008
    f = lambda u: math.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    sch = schedules.get_schedule("cosine", num_timesteps)
    # ᾱ at 0-based index i is f((i+1)/T)/f(0) wherever β was not clipped (all but the last step).
    for i in [0, num_timesteps // 2 - 1, num_timesteps - 2]:
        np.testing.assert_allclose(
            sch.alphas_cumprod[i], f((i + 1) / num_timesteps) / f(0), rtol=2e-5
        )
    # Half way the closed form is cos²((½+s)/(1+s)·π/2)/f(0).
    np.testing.assert_allclose(sch.alphas_cumprod[num_timesteps // 2 - 1], f(0.5) / f(0), rtol=1e-5)
    # The last β is 1 − f(1)/f(1−1/T) = 1, clipped at 0.999.
    np.testing.assert_allclose(sch.betas[-1], 0.999, rtol=1e-6)
    assert np.all(sch.betas <= 0.999 + 1e-7)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
@pytest.mark.parametrize("num_timesteps", [25, 1000])
def test_alphas_cumprod_strictly_decreasing_and_in_unit_interval(name, num_timesteps):
    ac = np.asarray(schedules.get_schedule(name, num_timesteps).alphas_cumprod, np.float64)
    assert np.all(np.diff(ac) < 0)
    assert np.all((ac > 0) & (ac < 1))


def _float64_alphas_cumprod(name, num_timesteps):
    """ᾱ written out from the papers in float64, independent of the module."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.cumprod(1 - np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps))
    u = np.arange(num_timesteps + 1) / num_timesteps
    f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_derived_constants_are_consistent(name):
    s = schedules.get_schedule(name, 1000)
    ac = _float64_alphas_cumprod(name, 1000)
    np.testing.assert_allclose(s.snr, ac / (1 - ac), rtol=1e-4)
    np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ac) / ac), rtol=1e-4)
    np.testing.assert_allclose(s.alphas_cumprod_prev[0], 1.0)
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], ac[:-1], rtol=1e-6)
    np.testing.assert_allclose(
        s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]), rtol=1e-5
    )
    assert s.num_timesteps == 1000
    for leaf in [s.betas, s.snr, s.sigmas, s.posterior_mean_coef1]:
        assert leaf.dtype == np.float32


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_vp_ve_round_trip(name):
    s = schedules.get_schedule(name, 1000)
    # ᾱ → σ → ᾱ is well conditioned in float32.
    sigma = schedules.vp_to_ve_sigma(s.alphas_cumprod)
    np.testing.assert_allclose(schedules.ve_to_vp_alpha_cumprod(sigma), s.alphas_cumprod, rtol=1e-5)
    # σ → ᾱ → σ loses digits where ᾱ ≈ 1 (1−ᾱ cancels), so check it from σ = 0.1 up.
    big = s.sigmas[s.sigmas > 0.1]
    np.testing.assert_allclose(
        schedules.vp_to_ve_sigma(schedules.ve_to_vp_alpha_cumprod(big)), big, rtol=1e-4
    )
    # The stored σ come from float64, so they stay exact even where ᾱ rounds near 1.
    ac = _float64_alphas_cumprod(name, 1000)
    np.testing.assert_allclose(s.sigmas, np.sqrt((1 - ac) / ac), rtol=1e-6)
    t = np.arange(1000)
    np.testing.assert_array_equal(schedules.sigma_to_timestep(s, s.sigmas), t)


def test_edm_sigmas_follow_karras_eq5():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    sig = np.asarray(schedules.edm_sigmas(n), np.float64)
    assert sig.shape == (n + 1,)
    np.testing.assert_allclose(sig[0], smax, rtol=1e-6)
    np.testing.assert_allclose(sig[n - 1], smin, rtol=1e-5)
    assert sig[n] == 0.0
    i = 7
    expected = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    np.testing.assert_allclose(sig[i], expected, rtol=1e-6)
    assert np.all(np.diff(sig) < 0)
    assert schedules.edm_sigmas(5, append_zero=False).shape == (5,)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: schedules.get_schedule("quadratic", 1000),
            "schedule name 'quadratic'.*linear, cosine",
        ),
        (lambda: schedules.get_schedule("linear", 0), "num_timesteps"),
        (lambda: schedules.get_schedule("linear", 20), "num_timesteps.*≥ 21"),
        (lambda: schedules.get_schedule("linear", 10.5), "num_timesteps"),
        (lambda: schedules.edm_sigmas(0), "num_steps"),
        (lambda: schedules.edm_sigmas(10, sigma_min=5.0, sigma_max=1.0), "sigma_min < sigma_max"),
        (lambda: schedules.edm_sigmas(10, rho=0.0), "rho"),
        (lambda: schedules.schedule_from_betas(np.array([0.5, 1.5])), "betas"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
