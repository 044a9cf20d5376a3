"""Samplers against closed forms: respacing semantics and the exact denoiser of a two-point data set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_bs import sampling, schedules


def _guided_diffusion_space_timesteps(num_timesteps, section_counts):
    """guided-diffusion's respacing rule, written out from its description for comparison."""
    if section_counts.startswith("ddim"):
        n = int(section_counts[4:])
        stride = next(i for i in range(1, num_timesteps) if len(range(0, num_timesteps, i)) == n)
        return set(range(0, num_timesteps, stride))
    counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    out, start = set(), 0
    for i, c in enumerate(counts):
        size = size_per + (i < extra)
        frac = 1 if c <= 1 else (size - 1) / (c - 1)
        cur = 0.0
        for _ in range(c):
            out.add(start + round(cur))
            cur += frac
        start += size
    return out


@pytest.mark.parametrize("counts", ["ddim25", "ddim50", "10,10,5", "100", "7", "250,200,100,50"])
def test_space_timesteps_matches_guided_diffusion(counts):
    got = sampling.space_timesteps(1000, counts)
    assert set(got) == _guided_diffusion_space_timesteps(1000, counts)
    assert got == sorted(got)


def test_space_timesteps_examples():
    assert sampling.space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert sampling.space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    with pytest.raises(ValueError, match="section 0 has 5 steps"):
        sampling.space_timesteps(10, "6,1")
    with pytest.raises(ValueError, match="no integer stride"):
        sampling.space_timesteps(1000, "ddim999")


def test_respaced_schedule_keeps_alphas_cumprod():
    full = schedules.get_schedule("linear", 1000)
    kept = sampling.space_timesteps(1000, "ddim50")
    sp = sampling.respace("linear", 1000, "ddim50")
    np.testing.assert_allclose(
        sp.schedule.alphas_cumprod, full.alphas_cumprod[np.array(kept)], rtol=1e-5
    )
    np.testing.assert_array_equal(sp.timestep_map, kept)


def _two_point_eps_model(schedule, a):
    """Exact ε-prediction for data {−a, +a} with equal mass: E[x0|x_t] = a·tanh(√ᾱ a x_t/(1−ᾱ))."""
    ac = schedule.alphas_cumprod

    def model_fn(x, t):
        a_t = ac[t].reshape((-1, 1, 1, 1))
        x0 = a * jnp.tanh(jnp.sqrt(a_t) * a * x / (1 - a_t))
        return (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)

    return model_fn


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_samplers_with_the_exact_denoiser_land_on_the_data(method):
    a, n = 0.5, 2000
    schedule = schedules.get_schedule("cosine", 1000)
    model_fn = _two_point_eps_model(schedule, a)
    shape = (n, 1, 1, 1)
    if method == "ddim":
        x = sampling.ddim_sample(model_fn, "cosine", 1000, shape, jax.random.key(0), steps=50)
    else:
        x = sampling.ddpm_sample(model_fn, "cosine", 1000, shape, jax.random.key(0), steps=100)
    x = np.asarray(x).ravel()
    assert np.all(np.abs(np.abs(x) - a) < 0.02)  # every sample sits on a data point
    frac = np.mean(x > 0)
    assert abs(frac - 0.5) < 4 * np.sqrt(0.25 / n)  # the two modes get equal mass (4 s.e.)


def test_image_grid_layout():
    imgs = np.zeros((5, 2, 3, 1), np.uint8)
    grid = sampling.image_grid(imgs, ncols=3)
    assert grid.shape == (2 * 4, 3 * 5, 1)
    assert sampling.to_uint8(jnp.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
