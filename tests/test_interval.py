"""The optimal-transport locator of t_δ: ott-jax Sinkhorn against POT and ott's own divergence,
the estimators' behaviour along the forward process, the K fit, t_δ, mode=locate's files."""

import importlib
import json
import logging
import math

import jax
import ml_collections
import numpy as np
import ot
import pytest
from ott.geometry import pointcloud
from ott.tools import sinkhorn_divergence
from test_generate import fake_gcs  # noqa: F401  (the gs:// stand-in fixture)

from configs import digits
from ddpm_bs import interval, schedules

T = 1000


def _noised(images, noise, alpha_bar):
    """x_t = √ᾱ x + √(1−ᾱ) ξ in float64 (the reference side)."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    return math.sqrt(alpha_bar) * x + math.sqrt(1.0 - alpha_bar) * np.asarray(noise, np.float64)


def _alpha_bar(name, t):
    return float(np.cumprod(1.0 - schedules.betas64(name, T))[t])


@pytest.fixture(scope="module")
def clouds():
    """Two small point clouds (n = 100, 96; d = 20) in [−1, 1] with different means."""
    rng = np.random.default_rng(0)
    a = np.tanh(rng.normal(0.3, 0.6, size=(100, 20))).astype(np.float32)
    b = np.tanh(rng.normal(-0.2, 0.5, size=(96, 20))).astype(np.float32)
    return a, b


def _reference_plan_costs(x, y, eps):
    """POT's sinkhorn plan, run to a tight tolerance: (⟨P, M⟩ via sinkhorn2, reg. cost)."""
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    m = ot.dist(x, y)
    transport = ot.sinkhorn2(a, b, m, eps, stopThr=1e-12, numItermax=100_000)
    plan = ot.sinkhorn(a, b, m, eps, stopThr=1e-12, numItermax=100_000)
    reg = np.sum(plan * m) + eps * np.sum(plan * (np.log(plan) - np.log(np.outer(a, b))))
    return float(transport), float(reg)


def test_transport_and_regularised_cost_match_pot(clouds):
    a, b = clouds
    timesteps = np.array([0, 300, 700])
    key = jax.random.key(1)
    kwargs = dict(
        schedule="linear",
        num_timesteps=T,
        timesteps=timesteps,
        key=key,
        num_seeds=1,
        estimator="naive",
        threshold=1e-6,
        max_iterations=5000,
    )
    dense = interval.w2_curve(a, b, **kwargs)
    online = interval.w2_curve(a, b, batch_size=32, **kwargs)  # blocks of 32 rows, 4 blocks
    noise = interval.seed_noise(key, 0, len(a), len(b), a.shape[1])
    for k, t in enumerate(timesteps):
        ab = _alpha_bar("linear", t)
        x, y = _noised(a, noise["a"], ab), _noised(b, noise["b"], ab)
        eps = float(dense.epsilon[0, k])
        np.testing.assert_allclose(eps, 0.02 * ot.dist(x, y).mean(), rtol=1e-4)
        transport, reg = _reference_plan_costs(x, y, eps)
        for curve in (dense, online):  # Gram-matrix costs and q_sample + ott online costs
            assert curve.converged["ab"][0, k]
            np.testing.assert_allclose(curve.transport["ab"][0, k], transport, rtol=1e-3)
            np.testing.assert_allclose(curve.regularized["ab"][0, k], reg, rtol=1e-3)
    np.testing.assert_array_equal(dense.estimate, dense.transport["ab"])


def test_small_epsilon_transport_cost_is_close_to_exact_w2(clouds):
    a, b = clouds
    key = jax.random.key(2)
    curve = interval.w2_curve(
        a,
        b,
        schedule="cosine",
        num_timesteps=T,
        timesteps=np.array([0, 500]),
        key=key,
        num_seeds=1,
        estimator="naive",
        epsilon_rel=2e-3,
        threshold=1e-4,
        max_iterations=20_000,
    )
    noise = interval.seed_noise(key, 0, len(a), len(b), a.shape[1])
    for k, t in enumerate((0, 500)):
        ab = _alpha_bar("cosine", t)
        x, y = _noised(a, noise["a"], ab), _noised(b, noise["b"], ab)
        exact = ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), ot.dist(x, y))
        assert curve.converged["ab"][0, k]
        assert abs(curve.transport["ab"][0, k] / exact - 1.0) < 0.02


def test_sinkhorn_divergence_matches_ott_tool(clouds):
    a, b = clouds
    key = jax.random.key(3)
    t = 400
    curve = interval.w2_curve(
        a,
        b,
        schedule="linear",
        num_timesteps=T,
        timesteps=np.array([0, t]),
        key=key,
        num_seeds=1,
        estimator="sinkhorn_divergence",
        threshold=1e-6,
        max_iterations=5000,
    )
    noise = interval.seed_noise(key, 0, len(a), len(b), a.shape[1])
    ab = _alpha_bar("linear", t)
    x = _noised(a, noise["a"], ab).astype(np.float32)
    y = _noised(b, noise["b"], ab).astype(np.float32)

    @jax.jit
    def reference(x, y, eps):
        with jax.numpy_rank_promotion("allow"):  # ott broadcasts implicitly
            return sinkhorn_divergence.sinkhorn_divergence(
                pointcloud.PointCloud,
                x,
                y,
                epsilon=eps,
                solve_kwargs={"threshold": 1e-6, "max_iterations": 5000},
            )[0]

    div = reference(x, y, float(curve.epsilon[0, 1]))
    np.testing.assert_allclose(curve.estimate[0, 1], float(div), rtol=2e-3)
    assert set(curve.estimates) == {"naive", "sinkhorn_divergence"}


@pytest.fixture(scope="module")
def gaussian_curve():
    """Two Gaussian sets in d = 128 whose means differ, through the linear schedule."""
    rng = np.random.default_rng(4)
    d = 128
    a = rng.normal(0.2, 0.3, size=(200, d)).astype(np.float32)
    b = rng.normal(-0.2, 0.3, size=(200, d)).astype(np.float32)
    return interval.w2_curve(
        a,
        b,
        schedule="linear",
        num_timesteps=T,
        timesteps=np.array([0, 50, 100, 200, 300, 400, 600, 800, 999]),
        key=jax.random.key(5),
        num_seeds=2,
        all_estimators=True,
        chunk_size=4,  # three scans; the potentials carry over between them
    )


def test_debiased_baseline_decays_to_zero_while_naive_rises(gaussian_curve):
    c = gaussian_curve
    est = c.estimate.mean(axis=0)  # [K] W₂² estimate, debiased_baseline
    naive = c.estimates["naive"].mean(axis=0)
    divergence = c.estimates["sinkhorn_divergence"].mean(axis=0)
    assert np.all(np.diff(est) <= 0.01 * est[0]), est  # decays (up to noise)
    assert abs(est[-1]) < 0.01 * est[0] and abs(est[-2]) < 0.02 * est[0], est  # ≈ 0 at large t
    assert naive[-1] > 2.0 * naive[0], naive  # Eq. 8 as written rises (curve's docstring)
    assert np.all(np.diff(naive) > 0), naive
    assert divergence[-1] > divergence[0], divergence
    # The ratio is a W₂ ratio with its band; it starts at 1 and ends near 0.
    assert c.ratio[0] == 1.0 and c.ratio[-1] < 0.1
    assert np.all(c.ratio_band[0] <= c.ratio + 1e-7) and np.all(c.ratio <= c.ratio_band[1] + 1e-7)
    assert c.naive_ratio[-1] > 1.4
    # Means differing by a translation: W₂(t) = √ᾱ_t W₂(0) in population (K = ½); the finite-
    # sample estimate decays at least that fast.
    alpha_bar = np.exp(-c.s)
    assert np.all(est <= alpha_bar * est[0] * 1.02 + 1e-6)
    assert 0.3 < c.decay_rate < 1.5
    assert all(v.all() for v in c.converged.values())


def test_fit_decay_rate_recovers_k_of_an_exponential_curve():
    s = -np.log(np.cumprod(1.0 - schedules.betas64("cosine", T)))
    timesteps = interval.grid(T, 40)
    for k in (0.25, 0.5, 1.3):
        ratio = np.exp(-k * s[timesteps])
        assert interval.fit_decay_rate(s[timesteps], ratio) == pytest.approx(k, rel=1e-9)
        # A noise floor after the crossing (or zeros) does not bias the slope.
        floored = np.where(ratio < 0.1, 0.04, ratio)
        assert interval.fit_decay_rate(s[timesteps], floored) == pytest.approx(k, rel=1e-9)
        # Proposition 2 with the fitted K: K·s(t_δ) ≥ −ln δ first at t_δ.
        t_delta = interval.t_delta_from_rate(k, 0.1, schedule="cosine", num_timesteps=T)
        assert k * s[t_delta - 1] >= -math.log(0.1) > k * s[t_delta - 2]
    assert math.isnan(interval.fit_decay_rate(s[timesteps], np.zeros(len(timesteps))))
    assert interval.t_delta_from_rate(float("nan"), 0.1, schedule="cosine", num_timesteps=T) is None


def test_locate_t_delta_interpolates_and_returns_1_based():
    timesteps = np.array([0, 100, 200, 300, 999])
    located = interval.locate_t_delta(
        np.array([1.0, 0.5, 0.2, 0.05, 0.0]), 0.1, timesteps=timesteps, num_timesteps=T
    )
    # Crossing at 200 + (0.2 − 0.1)/(0.2 − 0.05)·100 = 266.7 → 0-based 267 → t_δ = 268.
    assert located.t_cross == pytest.approx(200 + 100 * 0.1 / 0.15)
    assert located.t_delta == 268 and located.fraction == pytest.approx(0.268)
    assert located.crossed
    # Exactly δ at grid point 200: the crossing (W ≤ δ·W(0)) is at index 200, so t_δ = 201.
    exact = interval.locate_t_delta(
        np.array([1.0, 0.5, 0.1, 0.05, 0.0]), 0.1, timesteps=timesteps, num_timesteps=T
    )
    assert exact.t_delta == 201
    # Never below δ: the whole range is significant.
    never = interval.locate_t_delta(
        np.array([1.0, 0.9, 0.8, 0.7, 0.6]), 0.1, timesteps=timesteps, num_timesteps=T
    )
    assert (never.t_delta, never.fraction, never.crossed) == (T, 1.0, False)


def test_locate_t_delta_on_a_curve(gaussian_curve):
    located = interval.locate_t_delta(gaussian_curve, 0.1)
    t = gaussian_curve.timesteps
    k = int(np.flatnonzero(gaussian_curve.ratio < 0.1)[0])
    assert t[k - 1] < located.t_delta <= t[k] + 1
    assert located.fraction == located.t_delta / T


def _digits_config(**interval_fields):
    config = digits.get_config()
    config.interval = ml_collections.ConfigDict(
        dict(num_images=60, num_t=8, num_seeds=1, max_iterations=200, **interval_fields)
    )
    return config


def test_run_locate_writes_json_and_png_and_load_t_delta_reads_it(tmp_path):
    workdir = str(tmp_path / "locate")
    assert interval.load_t_delta(workdir) is None
    result = interval.run_locate(_digits_config(), workdir, progress=False)
    with open(tmp_path / "locate" / "interval.json") as f:
        stored = json.load(f)
    assert stored["t_delta"] == result["t_delta"] == interval.load_t_delta(workdir)
    assert 1 <= result["t_delta"] <= T and result["fraction"] == result["t_delta"] / T
    assert stored["data"]["num_a"] == stored["data"]["num_b"] == 60
    assert stored["interval"]["set_a"] == "class:0" and stored["estimator"] == "debiased_baseline"
    curve = stored["curve"]
    assert len(curve["timesteps"]) == 8 and curve["timesteps"][0] == 0
    assert len(curve["ratio"]) == 8 and len(curve["naive_ratio"]) == 8
    assert set(curve["transport"]) == {"ab", "aa_prime", "bb_prime"}
    assert np.shape(curve["transport"]["ab"]) == (1, 8)
    assert math.isfinite(stored["decay_rate"])
    ratio = np.asarray(curve["ratio"], dtype=float)  # two digit classes drift together
    assert ratio[0] == 1.0 and ratio[-1] < 0.1 < ratio[3] < ratio[0], ratio
    png = (tmp_path / "locate" / "interval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "locate").glob("*.tmp"))


@pytest.mark.usefixtures("fake_gcs")  # gs://<bucket>/<key> is tmp_path/gcs/<bucket>/<key>
def test_run_locate_writes_and_reads_a_remote_workdir(tmp_path):
    result = interval.run_locate(_digits_config(), "gs://bucket/run", progress=False)
    stored = tmp_path / "gcs" / "bucket" / "run"
    assert sorted(p.name for p in stored.iterdir()) == ["interval.json", "interval.png"]
    assert json.loads((stored / "interval.json").read_text())["t_delta"] == result["t_delta"]
    assert interval.load_result("gs://bucket/run")["curve"] == result["curve"]
    assert interval.load_t_delta("gs://bucket/run") == result["t_delta"]
    assert not list((tmp_path / "cwd").iterdir())  # nothing went through the local filesystem


def test_load_result_reads_a_workdir_or_a_file_and_names_a_bad_one(tmp_path):
    assert interval.load_result(str(tmp_path)) is None  # nothing located yet
    written = {"t_delta": 801, "fraction": 0.801, "curve": {"ratio": [1.0, 0.05]}}
    (tmp_path / "interval.json").write_text(json.dumps(written))
    assert interval.load_result(str(tmp_path)) == written
    assert interval.load_result(tmp_path / "interval.json") == written  # the file itself
    assert interval.load_t_delta(str(tmp_path)) == 801
    for bad in ('{"fraction": 0.8}', '{"t_delta": 0}', '{"t_delta": true}', "[801]"):
        (tmp_path / "interval.json").write_text(bad)
        with pytest.raises(ValueError, match=r"interval\.json is not a readable interval\.json"):
            interval.load_result(str(tmp_path))


def test_w2_curve_reports_progress_per_timestep(clouds, caplog):
    a, b = clouds
    caplog.set_level(logging.INFO)
    kwargs = dict(schedule="linear", num_timesteps=T, timesteps=[0, 200, 400, 600, 999])
    interval.w2_curve(
        a, b, key=jax.random.key(0), num_seeds=2, chunk_size=2, progress=True, **kwargs
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "absl"]
    assert lines[0] == "W2 curve: started, 10 t to do."  # 2 seeds × 5 timesteps
    assert lines[-1].startswith("W2 curve: done, 10/10 t (100.0%) in "), lines
    caplog.clear()
    interval.w2_curve(a, b, key=jax.random.key(0), num_seeds=1, progress=False, **kwargs)
    assert not [r for r in caplog.records if "W2 curve" in r.getMessage()]


def test_perturbed_set_is_a_clipped_noisy_copy_of_set_a():
    config = _digits_config(set_a="all", set_b="perturbed", perturb_std=0.3)
    spec = interval.IntervalSpec.from_config(config.interval)
    from ddpm_bs import data
    from ddpm_bs.interval import job

    a, b = job._load_sets(data.DataSpec.from_config(config.data), spec, config.seed)
    assert a.shape == b.shape == (60, 8, 8, 1)
    assert b.min() >= -1.0 and b.max() <= 1.0
    assert 0.15 < np.std(b - a) < 0.3


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(delta=1.0), "interval.delta"),
        (dict(delta=0.0), "interval.delta"),
        (dict(estimator="exact"), "interval.estimator"),
        (dict(set_a="perturbed"), "interval.set_a"),
        (dict(set_b="class:x"), "interval.set_b"),
        (dict(set_b="class:0"), "interval.set_b"),  # same images as set_a
        (dict(num_images=0), "interval.num_images"),
        (dict(num_t=1), "interval.num_t"),
        (dict(epsilon_rel=-0.1), "interval.epsilon_rel"),
        (dict(unknown_field=3), "interval.unknown_field"),
    ],
)
def test_interval_spec_rejects_bad_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        interval.IntervalSpec.from_config(fields)


def test_run_locate_rejects_a_class_without_images(tmp_path):
    with pytest.raises(ValueError, match=r"interval.set_b: class 12 has no images"):
        interval.run_locate(_digits_config(set_b="class:12"), str(tmp_path), progress=False)


def test_bad_arguments_raise_naming_them(clouds, tmp_path):
    a, b = clouds
    kwargs = dict(schedule="linear", num_timesteps=T, timesteps=[0, 10], key=jax.random.key(0))
    with pytest.raises(ValueError, match="images_a is empty"):
        interval.w2_curve(a[:0], b, **kwargs)
    with pytest.raises(ValueError, match="images_b is empty"):
        interval.w2_curve(a, np.zeros((0, 20), np.float32), **kwargs)
    with pytest.raises(ValueError, match="same image shape"):
        interval.w2_curve(a, b[:, :10], **kwargs)
    with pytest.raises(ValueError, match="estimator must be one of"):
        interval.w2_curve(a, b, estimator="emd", **kwargs)
    with pytest.raises(ValueError, match="timesteps must be increasing"):
        interval.w2_curve(a, b, **{**kwargs, "timesteps": [0, T]})
    with pytest.raises(ValueError, match="num_seeds"):
        interval.w2_curve(a, b, num_seeds=0, **kwargs)
    with pytest.raises(ValueError, match="epsilon_rel"):
        interval.w2_curve(a, b, epsilon_rel=0.0, **kwargs)
    for delta in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match=r"delta must be in the open interval \(0, 1\)"):
            interval.locate_t_delta(np.ones(2), delta, timesteps=[0, 1], num_timesteps=T)
    with pytest.raises(ValueError, match="no finite ratio"):
        interval.locate_t_delta(np.full(2, np.nan), 0.1, timesteps=[0, 1], num_timesteps=T)
    (tmp_path / "interval.json").write_text("{not json")
    with pytest.raises(ValueError, match="interval.json"):
        interval.load_t_delta(str(tmp_path))


def test_non_finite_pixels_and_a_grid_outside_the_schedule_are_refused(clouds):
    a, b = clouds
    kwargs = dict(schedule="linear", num_timesteps=T, key=jax.random.key(0))
    bad = a.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="images_a has non-finite values"):
        interval.w2_curve(bad, b, timesteps=[0, 10], **kwargs)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="images_b has non-finite values"):
        interval.w2_curve(a, bad, timesteps=[0, 10], **kwargs)
    with pytest.raises(ValueError, match="timesteps"):
        interval.w2_curve(a, b, timesteps=[-1, 10], **kwargs)


def test_translated_gaussians_cross_delta_where_sqrt_alpha_bar_does():
    # A and B are the same Gaussian cloud shifted by m: W₂(A_t, B_t) = √ᾱ_t·‖m‖ exactly, so the
    # located t_δ must be where √ᾱ_t first falls below δ. The shift (‖m‖² = 64) dwarfs the
    # finite-sample term left after the baseline subtraction (≈ 1 at n = 400, d = 16), so the
    # crossing may move by a few grid points at most: 3% of T is allowed.
    rng = np.random.default_rng(7)
    cloud = rng.normal(0.0, 0.3, size=(400, 16)).astype(np.float32)
    a, b = cloud + 1.0, rng.normal(0.0, 0.3, size=(400, 16)).astype(np.float32) - 1.0
    grid = np.linspace(0, T - 1, 60).round().astype(int)
    curve = interval.w2_curve(
        a, b, schedule="linear", num_timesteps=T, timesteps=grid, key=jax.random.key(1), num_seeds=2
    )
    delta = 0.3
    located = interval.locate_t_delta(curve, delta)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    analytic = int(np.flatnonzero(np.sqrt(ac) < delta)[0]) + 1  # 1-based, as t_delta
    assert located.crossed
    assert abs(located.t_delta - analytic) <= 0.03 * T, (located.t_delta, analytic)


def test_auto_t_delta_sets_the_sampler_training_uses(tmp_path):
    from configs import default
    from ddpm_bs import state, train

    config = default.smoke(importlib.import_module("configs.digits").get_config())
    config.timesteps.t_delta = "auto"
    config.interval.num_images = 60
    config.interval.num_t = 8
    config.interval.num_seeds = 1
    result = train.locate_if_needed(config, str(tmp_path))
    located = interval.load_t_delta(str(tmp_path))
    assert located is not None and result["t_delta"] == located
    sampler = state.build_sampler(config, result)
    assert sampler.t_delta == located
    # A second start reuses interval.json instead of locating again.
    (tmp_path / "interval.png").unlink()
    assert train.locate_if_needed(config, str(tmp_path))["t_delta"] == located
    assert not (tmp_path / "interval.png").exists()
