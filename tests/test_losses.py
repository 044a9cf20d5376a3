"""Each weighting against its paper's formula, per example, for each target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_bs import diffusion, losses, schedules

T = 1000
TS = jnp.array([0, 3, 100, 400, 700, 999], jnp.int32)


def _batch(schedule, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.uniform(k1, (TS.shape[0], 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    xt = diffusion.q_sample(schedule, x0, TS, noise)
    x0_hat = x0 + 0.1 * jax.random.normal(k3, x0.shape)  # an imperfect model's x0 estimate
    return x0, noise, xt, x0_hat


def _paper_weight(weighting, target, snr, k=1.0, gamma=1.0, min_gamma=5.0):
    """The papers' per-target weights, written out directly (not via the ε-equivalence)."""
    if weighting == "none":
        return np.ones_like(snr)
    if weighting == "p2":  # Choi et al. 2022 define it on the ε-loss.
        eps_w = 1.0 / (k + snr) ** gamma
    elif weighting == "debias":  # Yu et al. 2024, on the ε-loss.
        eps_w = 1.0 / np.sqrt(snr)
    elif weighting == "min_snr":  # Hang et al. 2023, Table of Eqs. 6-7 per target.
        return {
            "eps": np.minimum(snr, min_gamma) / snr,
            "x0": np.minimum(snr, min_gamma),
            "v": np.minimum(snr, min_gamma) / (snr + 1),
        }[target]
    return eps_w * {"eps": 1.0, "x0": snr, "v": snr / (snr + 1)}[target]


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
@pytest.mark.parametrize("target", diffusion.TARGETS)
def test_loss_matches_hand_computed_weighted_mse(weighting, target):
    s = schedules.get_schedule("cosine", T)
    x0, noise, xt, _ = _batch(s)
    out = jax.random.normal(jax.random.key(9), x0.shape)
    spec = losses.LossSpec(target=target, weighting=weighting, p2_k=1.0, p2_gamma=0.5)
    got = losses.per_example_loss(spec, s, out, x0, xt, TS, noise)

    u = np.arange(T + 1) / T  # the cosine schedule in float64 (improved-DDPM Eq. 17)
    f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    ac = np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))[TS]
    snr = ac / (1 - ac)
    x0n, nn_, outn = (np.asarray(a, np.float64) for a in (x0, noise, out))
    want_target = {
        "eps": nn_,
        "x0": x0n,
        "v": np.sqrt(ac)[:, None, None, None] * nn_ - np.sqrt(1 - ac)[:, None, None, None] * x0n,
    }[target]
    mse = ((want_target - outn) ** 2).mean(axis=(1, 2, 3))
    w = _paper_weight(weighting, target, snr, k=1.0, gamma=0.5)
    np.testing.assert_allclose(got["mse"], mse, rtol=1e-4)
    np.testing.assert_allclose(got["weight"], w, rtol=1e-4)
    np.testing.assert_allclose(got["loss"], w * mse, rtol=2e-4)
    np.testing.assert_array_equal(got["vb"], 0.0)


@pytest.mark.parametrize("weighting", ["p2", "min_snr", "debias"])
def test_weighted_loss_is_the_same_objective_for_every_target(weighting):
    # A model whose outputs in the three parameterisations imply the same x0 gets the same loss.
    s = schedules.get_schedule("linear", T)
    x0, noise, xt, x0_hat = _batch(s, seed=1)
    eps_hat = diffusion.predict_eps_from_x0(s, xt, TS, x0_hat)
    outs = {"eps": eps_hat, "x0": x0_hat, "v": diffusion.v_from_x0_eps(s, x0_hat, eps_hat, TS)}
    vals = {
        target: losses.per_example_loss(
            losses.LossSpec(target=target, weighting=weighting), s, outs[target], x0, xt, TS, noise
        )["loss"]
        for target in diffusion.TARGETS
    }
    # Skip t=0 where ε from x0 divides by √(1−ᾱ) ≈ 0.01 and float32 rounding dominates.
    np.testing.assert_allclose(vals["x0"][1:], vals["eps"][1:], rtol=2e-3)
    np.testing.assert_allclose(vals["v"][1:], vals["eps"][1:], rtol=2e-3)


def test_weights_are_per_example_not_reduced_over_the_batch():
    s = schedules.get_schedule("cosine", T)
    spec = losses.LossSpec(weighting="min_snr")
    w_all = losses.loss_weight(spec, s.snr[TS])
    w_one = jnp.stack(
        [losses.loss_weight(spec, s.snr[TS[i : i + 1]])[0] for i in range(TS.shape[0])]
    )
    np.testing.assert_array_equal(w_all, w_one)
    perm = jnp.array([5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(losses.loss_weight(spec, s.snr[TS[perm]]), w_all[perm])


def test_max_weight_caps_each_example():
    s = schedules.get_schedule("cosine", T)
    w = losses.loss_weight(losses.LossSpec(weighting="debias", max_weight=10.0), s.snr[TS])
    assert float(w.max()) == 10.0
    uncapped = losses.loss_weight(losses.LossSpec(weighting="debias"), s.snr[TS])
    np.testing.assert_array_equal(w, np.minimum(uncapped, 10.0))


def test_hybrid_loss_adds_scaled_vlb_that_trains_only_the_variance():
    s = schedules.get_schedule("cosine", T)
    x0, noise, xt, _ = _batch(s, seed=2)
    spec = losses.LossSpec(learn_sigma=True)
    out = jnp.concatenate([noise + 0.05, jnp.zeros_like(noise)], axis=-1)
    terms = losses.per_example_loss(spec, s, out, x0, xt, TS, noise)
    p = diffusion.p_mean_variance(s, out, xt, TS, learn_sigma=True, clip_denoised=False)
    vb = diffusion.vb_terms_bpd(s, p["mean"], p["log_variance"], x0, xt, TS) * (T / 1000)
    np.testing.assert_allclose(terms["vb"], vb, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)

    # d(vb)/d(mean output) is zero (stop-gradient); d(vb)/d(variance output) is not.
    def vb_sum(o):
        return losses.per_example_loss(spec, s, o, x0, xt, TS, noise)["vb"].sum()

    g = jax.grad(vb_sum)(out)
    np.testing.assert_array_equal(g[..., :3], 0.0)
    assert float(jnp.abs(g[..., 3:]).sum()) > 0


def test_hybrid_vlb_is_scaled_by_t_over_1000():
    s = schedules.get_schedule("linear", 4000)
    x0 = jnp.zeros((1, 2, 2, 3))
    noise = jnp.ones_like(x0)
    t = jnp.array([10])
    xt = diffusion.q_sample(s, x0, t, noise)
    out = jnp.concatenate([noise, 0.3 * jnp.ones_like(noise)], axis=-1)
    terms = losses.per_example_loss(losses.LossSpec(learn_sigma=True), s, out, x0, xt, t, noise)
    p = diffusion.p_mean_variance(s, out, xt, t, learn_sigma=True, clip_denoised=False)
    raw = diffusion.vb_terms_bpd(s, p["mean"], p["log_variance"], x0, xt, t)
    np.testing.assert_allclose(terms["vb"], 4.0 * raw, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target="score"), "target 'score'.*eps, x0, v"),
        (dict(weighting="snr"), "weighting 'snr'.*none, p2, min_snr, debias"),
        (dict(p2_k=-1.0), "p2_k"),
        (dict(p2_gamma=-0.5), "p2_gamma"),
        (dict(weighting="p2", p2_k=0.0), "p2_k"),
        (dict(min_snr_gamma=0.0), "min_snr_gamma"),
        (dict(max_weight=0.0), "max_weight"),
    ],
)
def test_bad_spec_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.LossSpec(**kwargs)


def test_mismatched_output_shape_is_reported():
    s = schedules.get_schedule("linear", T)
    x0 = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="learn_sigma"):
        losses.per_example_loss(losses.LossSpec(), s, jnp.zeros((2, 4, 4, 6)), x0, x0, TS[:2], x0)
