"""The geometry of the VE PF-ODE (Chen et al., "A Geometric Perspective on Diffusion Models").

References are independent: float64 numpy softmax, Gaussian closed forms (denoiser and ODE
solution), DDIM's update written out in float64. The findings are measured on scikit-learn's
8×8 digits with the optimal denoiser; thresholds are stated beside the measured values.
"""

import functools
import importlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import fake_gcs  # noqa: F401  (the gs:// stand-in fixture)

from ddpm_bs import data, geometry, schedules

EPS32 = float(np.finfo(np.float32).eps)


def _softmax_reference(x, sigma, y):
    """Posterior mean under uniform(y) in float64 with direct distances: [B, d]."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    logits = -((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / (2.0 * sigma**2)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ y


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(300, 16)).astype(np.float32)
    x = np.concatenate([y[:3] + 0.05 * rng.normal(size=(3, 16)), 1.5 * rng.normal(size=(5, 16))])
    return x.astype(np.float32), y


# --- The optimal denoiser ----------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1e-3, 0.3, 1.0, 3.0, 1e4])
def test_optimal_denoiser_matches_float64_softmax(points, sigma):
    x, y = points
    got = np.asarray(geometry.optimal_denoiser(x, sigma, y, chunk_size=64))
    # float32 GEMM distances: measured ≤ 2e-6 off the float64 reference over these σ.
    np.testing.assert_allclose(got, _softmax_reference(x, sigma, y), atol=2e-5)


def test_tiny_sigma_gives_the_nearest_neighbour_and_huge_sigma_the_mean(points):
    x, y = points
    nearest = y[np.argmin(((x[:, None] - y[None]) ** 2).sum(-1), axis=1)]
    np.testing.assert_allclose(geometry.optimal_denoiser(x, 1e-3, y), nearest, atol=1e-6)
    mean = np.broadcast_to(y.astype(np.float64).mean(axis=0), x.shape)
    np.testing.assert_allclose(geometry.optimal_denoiser(x, 1e4, y), mean, atol=1e-5)


def test_one_data_point_is_its_own_posterior_mean(points):
    x, y = points
    for sigma in (1e-3, 1.0, 1e3):
        out = geometry.optimal_denoiser(x, sigma, y[:1])
        np.testing.assert_array_equal(out, np.broadcast_to(y[:1], x.shape))


def test_per_example_sigma(points):
    x, y = points
    sigmas = np.linspace(0.2, 2.0, x.shape[0])
    got = geometry.optimal_denoiser(x, sigmas, y)
    want = np.concatenate([_softmax_reference(x[i : i + 1], s, y) for i, s in enumerate(sigmas)])
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 299, 300, 1000])
def test_chunked_equals_unchunked(points, chunk_size):
    x, y = points
    whole = geometry.optimal_denoiser(x, 0.7, y, chunk_size=None)
    # Chunking only reorders float32 sums of 300 rescaled terms: differences of a few 1e-6.
    np.testing.assert_allclose(
        geometry.optimal_denoiser(x, 0.7, y, chunk_size=chunk_size), whole, atol=1e-5
    )


def test_log_sum_exp_is_stable_far_from_the_data(points):
    _, y = points
    x = (y[:4] + 30.0).astype(np.float32)  # every ‖x − y‖²/(2σ²) is ≥ 1e4: exp underflows
    sigma = 0.5
    logits = -((x[:, None] - y[None]) ** 2).sum(-1) / (2 * sigma**2)
    with np.errstate(invalid="ignore"):
        naive = (np.exp(logits) @ y) / np.exp(logits).sum(1, keepdims=True)
    assert np.all(np.isnan(naive))  # the naive softmax is 0/0 here
    got = np.asarray(geometry.optimal_denoiser(x, sigma, y, chunk_size=32))
    assert np.all(np.isfinite(got))
    # ‖x‖² ≈ 1e4: the GEMM expansion rounds a distance by ~1e-3, a logit by ~4e-3.
    np.testing.assert_allclose(got, _softmax_reference(x, sigma, y), atol=2e-2)


def test_empirical_denoiser_of_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mu, s, n = np.array([0.5, -0.3]), 0.7, 20_000
    y = (mu + s * rng.normal(size=(n, 2))).astype(np.float32)
    for sigma in (0.3, 1.0, 3.0):
        x = mu + np.sqrt(s**2 + sigma**2) * rng.normal(size=(32, 2))  # typical noisy points
        got = np.asarray(geometry.optimal_denoiser(x.astype(np.float32), sigma, y))
        exact = mu + s**2 / (s**2 + sigma**2) * (x - mu)
        # Sampling error: D is a weighted mean of n draws. Its standard error per coordinate is
        # √(posterior variance / ESS), with posterior variance s²σ²/(s²+σ²) and the effective
        # sample size ESS = (Σw)²/Σw² of the softmax weights (≈ n at large σ, where the error
        # is that of the sample mean, s/√n). Allow 5 standard errors.
        logits = -((x[:, None] - y[None].astype(np.float64)) ** 2).sum(-1) / (2 * sigma**2)
        w = np.exp(logits - logits.max(1, keepdims=True))
        ess = w.sum(1) ** 2 / (w**2).sum(1)
        se = np.sqrt(s**2 * sigma**2 / (s**2 + sigma**2) / ess)
        assert np.all(np.abs(got - exact) <= 5 * se[:, None] + 1e-5), (sigma, ess.min())


# --- Mean shift and the ODE solvers --------------------------------------------------------------


def test_euler_step_to_zero_is_a_mean_shift_step(points):
    x, y = points
    for sigma in (0.3, 2.0):
        traj = geometry.solve(
            lambda a, s: geometry.optimal_denoiser(a, s, y), x, [sigma, 0.0], "euler"
        )
        shift = geometry.mean_shift_step(x, sigma, y)
        np.testing.assert_array_equal(shift, geometry.optimal_denoiser(x, sigma, y))
        # x + (0 − σ)(x − D)/σ = D exactly in real arithmetic; in float32, to the rounding of x.
        np.testing.assert_allclose(traj.samples[-1], shift, atol=4 * EPS32 * np.abs(x).max())
        # Written as mean shift, (σ'/σ)x + (1 − σ'/σ)D, the identity is exact in float too.
        np.testing.assert_array_equal(geometry.euler_from_denoised(x, sigma, 0.0, shift), shift)


def _gaussian_ode_error(method, num_steps, mu=0.3, std=0.5):
    sigmas = schedules.edm_sigmas(num_steps, append_zero=False)  # ends at σ_min = 0.002
    x_max = 80.0 * jax.random.normal(jax.random.key(0), (4, 3))
    traj = geometry.solve(geometry.gaussian_denoiser(mu, std), x_max, sigmas, method)
    s0, s1 = float(sigmas[0]), float(sigmas[-1])
    exact = mu + np.sqrt(std**2 + s1**2) / np.sqrt(std**2 + s0**2) * (np.asarray(x_max) - mu)
    return np.abs(np.asarray(traj.samples[-1], np.float64) - exact).max()


@pytest.mark.parametrize(
    "method, low, high",
    # Error ratio when the steps double (32 → 64), measured: Euler 1.99, Heun 4.28, DPM-Solver-2
    # 4.26, DPM-Solver++(2M) 4.46; the errors (6e-2 … 3e-3) are far above float32 rounding.
    [("euler", 1.8, 2.2), ("heun", 3.6, 4.6), ("dpm2", 3.6, 4.6), ("dpmpp_2m", 3.6, 4.8)],
)
def test_solver_order_on_the_gaussian_closed_form(method, low, high):
    ratio = _gaussian_ode_error(method, 32) / _gaussian_ode_error(method, 64)
    assert low < ratio < high, ratio


# --- The VP model as a VE denoiser ------------------------------------------------------------


def _gaussian_vp_model(schedule, mu, std, target, learn_sigma):
    """The exact VP network for y ~ N(mu, std²I): E[ε | x_t] (or x0, v) at integer t."""
    ac = schedule.alphas_cumprod

    def model_fn(x_t, t):
        a = ac[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        x0 = mu + std**2 * jnp.sqrt(a) / (a * std**2 + 1 - a) * (x_t - jnp.sqrt(a) * mu)
        eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        out = {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[target]
        return jnp.concatenate([out, jnp.zeros_like(out)], axis=-1) if learn_sigma else out

    return model_fn


@pytest.mark.parametrize("target, learn_sigma", [("eps", False), ("x0", False), ("v", True)])
def test_vp_model_on_its_grid_is_the_exact_ve_denoiser(target, learn_sigma):
    schedule = schedules.get_schedule("cosine", 1000)
    mu, std = 0.2, 0.6
    model_fn = _gaussian_vp_model(schedule, mu, std, target, learn_sigma)
    denoise = geometry.vp_model_as_denoiser(model_fn, schedule, target, learn_sigma)
    exact = geometry.gaussian_denoiser(mu, std)
    sigma = schedule.sigmas[jnp.array([0, 100, 500, 900])]  # one grid level per example
    scale = jnp.sqrt(std**2 + sigma**2).reshape(4, 1, 1, 1)
    x = mu + scale * jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
    np.testing.assert_allclose(denoise(x, sigma), exact(x, sigma), rtol=1e-4, atol=1e-4)


def test_euler_on_the_grid_is_ddim():
    """Karras et al. 2022 (§3): DDIM (η = 0) is the Euler method of the VE ODE (1)."""
    schedule = schedules.get_schedule("cosine", 1000)
    model_fn = _gaussian_vp_model(schedule, 0.2, 0.6, "eps", False)
    kept = np.array([950, 800, 600, 400, 200, 50, 0])
    ac = np.asarray(schedule.alphas_cumprod, np.float64)
    x_t = np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 4, 1)), np.float64)  # at kept[0]
    x_ve = x_t / np.sqrt(ac[kept[0]])
    for i, t in enumerate(kept):  # DDIM Eq. 12 with η = 0, written out in float64
        a = ac[t]
        a_prev = ac[kept[i + 1]] if i + 1 < len(kept) else 1.0
        eps = np.asarray(jax.jit(model_fn)(jnp.asarray(x_t, jnp.float32), jnp.full((2,), t)))
        x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x_t = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    sigmas = np.append(np.asarray(schedule.sigmas)[kept], 0.0)
    denoise = geometry.vp_model_as_denoiser(model_fn, schedule)
    traj = geometry.solve(denoise, x_ve.astype(np.float32), sigmas, "euler")
    np.testing.assert_allclose(traj.samples[-1], x_t, rtol=1e-4, atol=1e-4)


def test_snap_sigmas_puts_the_ladder_on_the_grid():
    schedule = schedules.get_schedule("cosine", 1000)
    snapped = geometry.snap_sigmas(schedules.edm_sigmas(18), schedule)
    grid = np.asarray(schedule.sigmas)
    assert snapped[-1] == 0.0 and np.all(np.diff(snapped) < 0)
    assert all(np.any(grid == s) for s in snapped[:-1])
    assert len(snapped) == 18  # 0.002 and 0.0075 both snap to σ_0 = 0.0064: merged


# --- Findings on digits (optimal denoiser) -------------------------------------------------------


@pytest.fixture(scope="module")
def digits_trajectories():
    images = data.load_all(data.DataSpec(name="digits", image_size=8, channels=1))
    sigmas = schedules.edm_sigmas(18)
    noise = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))

    @jax.jit
    def run(x, d):
        denoise = lambda a, s: geometry.optimal_denoiser(a, s, d)
        return {m: geometry.solve(denoise, x, sigmas, m) for m in geometry.SOLVERS}

    return images, jax.device_get(run(noise * float(sigmas[0]), jnp.asarray(images)))


def test_denoising_trajectory_converges_before_the_sampling_trajectory(digits_trajectories):
    _, trajs = digits_trajectories
    traj = trajs["heun"]
    conv = geometry.convergence(traj)
    # Measured (16 trajectories): ‖D(x_σ) − x_final‖ / ‖x_σ − x_final‖ ≤ 0.18 at every σ > 0 (0.007
    # at σ = 80, where x is 645 away and D 4.2), and D is within 1e-7 of the final sample from
    # σ ≈ 0.3 on, while x_σ is still 2.3 away there.
    assert np.all(conv["ratio"] < 0.35), conv["ratio"]
    i = int(np.argmin(np.abs(np.asarray(traj.sigmas) - 0.3)))
    assert np.all(conv["denoised_to_final"][i] < 1e-3)
    assert np.all(conv["sample_to_final"][i] > 1.0)


def test_sampling_trajectories_are_quasi_linear(digits_trajectories):
    _, trajs = digits_trajectories
    lin = geometry.quasi_linearity(trajs["heun"].samples)
    # Measured: max deviation from the chord ≤ 0.0064 of its length (chord ≈ 645 in d = 64),
    # and the first principal direction carries 99.994% of the points' variance.
    assert np.all(lin["max_relative_deviation"] < 0.02), lin["max_relative_deviation"]
    assert np.all(lin["pca_explained_variance"][:, 0] > 0.999)


def test_curvature_is_the_turn_of_the_denoising_output(digits_trajectories):
    _, trajs = digits_trajectories
    curv = geometry.curvature(trajs["heun"], "heun")
    assert curv["identity_max_error_deg"] < 0.01  # an identity: float error only (6e-4°)
    # Measured Spearman 0.95 between the turn angle and ‖ΔD‖/‖x − D‖ (the turns peak at σ ≈ 2).
    assert curv["spearman"] > 0.8, curv["spearman"]
    euler = geometry.curvature(trajs["euler"], "euler")
    assert euler["raw_denoised_max_error_deg"] < 0.01  # for Euler D̄ = D: the raw D explains it


def test_optimal_denoiser_samples_copy_training_points(digits_trajectories):
    images, trajs = digits_trajectories
    for traj in trajs.values():
        assert traj.samples.shape == (19, 8, 8, 8, 1)
        assert traj.denoised.shape == traj.extra_denoised.shape == (18, 8, 8, 8, 1)
        # The step to σ = 0 lands on D; D of the empirical data is a training point (the
        # data's nearest-neighbour distances are ~2, median).
        np.testing.assert_allclose(traj.samples[-1], traj.denoised[-1], atol=1e-5)
        assert np.all(geometry.nearest_data_distance(traj.samples[-1], images) < 1e-4)


@pytest.mark.parametrize("method", geometry.SOLVERS)
def test_solver_steps_are_euler_steps_with_a_finite_difference_denoiser(
    digits_trajectories, method
):
    _, trajs = digits_trajectories
    check = geometry.finite_difference_check(trajs[method], method)
    assert check["max_rel_error"] < 1e-5, check  # measured ≤ 3e-7: float32 rounding
    if method == "heun":
        # EDM's Heun is *not* the Euler step with the plain average of D (measured 4e-2).
        assert check["average_form_max_rel_error"] > 1e-3


# --- Beyond the paper: DP schedules, and a curved control -------------------------------------


def _gaussian_mixture(n=400, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    return (centers[rng.integers(0, 3, n)] + 0.3 * rng.normal(size=(n, 2))).astype(np.float32)


@pytest.fixture(scope="module")
def mixture_teacher():
    """Heun on 300 EDM steps from 16 noises, with the optimal denoiser of a 2-D mixture."""
    y = jnp.asarray(_gaussian_mixture())
    denoise = lambda a, s: geometry.optimal_denoiser(a, s, y)
    x0 = 80.0 * jax.random.normal(jax.random.key(0), (16, 2))
    fine = schedules.edm_sigmas(300)
    teacher = jax.device_get(jax.jit(lambda x: geometry.solve(denoise, x, fine, "heun"))(x0))
    return y, denoise, teacher


@pytest.mark.parametrize("solver", geometry.DP_SOLVERS)
def test_dp_schedule_never_loses_to_the_ladders_it_could_have_chosen(mixture_teacher, solver):
    _, denoise, teacher = mixture_teacher
    costs = geometry.step_costs(teacher, denoise=denoise, solver=solver, num_candidates=40)
    grid = schedules.get_schedule("cosine", 1000)
    t_max = int(np.argmin(np.abs(np.log(np.asarray(grid.sigmas)) - np.log(80.0))))
    for k in (2, 3, 5, 8):
        _, best = geometry.dp_path(costs, k)
        for ladder in (schedules.edm_sigmas(k), geometry.uniform_t_sigmas(grid, k, t_max)):
            path = geometry.snap_to_candidates(ladder, costs)
            # The DP is exact over paths of the candidate grid: never above a ladder snapped to
            # it with as many steps (the snapped ladder may merge levels: compare at its length).
            _, best_same = geometry.dp_path(costs, len(path) - 1)
            assert best_same <= geometry.path_cost(costs, path) + 1e-9
        # Measured for Heun at K = 5: DP 1.1 vs ρ = 7 snapped 2.8 (mean ‖error‖ summed).
        assert best <= geometry.path_cost(
            costs, geometry.snap_to_candidates(schedules.edm_sigmas(k), costs)
        )


def test_dp_schedule_shape_and_full_grid(mixture_teacher):
    _, denoise, teacher = mixture_teacher
    costs = geometry.step_costs(teacher, denoise=denoise, solver="heun", num_candidates=12)
    m = costs.sigmas.size
    assert costs.sigmas[-1] == 0 and np.all(np.diff(costs.sigmas) < 0)
    np.testing.assert_array_equal(geometry.dp_path(costs, m - 1)[0], np.arange(m))
    np.testing.assert_array_equal(geometry.dp_schedule(None, 2 * m - 3, costs=costs), costs.sigmas)
    for nfe in (1, 4, 5, 6, 9):
        sig = geometry.dp_schedule(None, nfe, costs=costs)
        k = geometry.nfe_to_steps(nfe, "heun")
        assert sig.shape == (k + 1,) and sig[-1] == 0 and sig[0] == costs.sigmas[0]
        assert np.all(np.diff(sig) < 0)
        assert geometry.steps_to_nfe(k, "heun") == 2 * k - 1 <= nfe
    assert geometry.nfe_to_steps(6, "euler") == 6
    # The tuple form of the teacher and the one-call API agree with the table.
    direct = geometry.dp_schedule(
        (teacher.sigmas, teacher.samples), 5, denoise=denoise, num_candidates=12
    )
    np.testing.assert_array_equal(direct, geometry.dp_schedule(None, 5, costs=costs))
    with pytest.raises(ValueError, match="num_steps"):
        geometry.dp_path(costs, m)
    with pytest.raises(ValueError, match="window"):
        geometry.dp_path(
            geometry.step_costs(teacher, denoise=denoise, num_candidates=12, window=2), 2
        )


def _rotation_denoiser(angular_rate):
    """A fake denoiser whose PF-ODE (1) is dx/dσ = A x, A = [[0, −ω], [ω, 0]]: circles."""
    a = jnp.array([[0.0, -angular_rate], [angular_rate, 0.0]])

    def denoise(x, sigma):  # (x − D)/σ = A x  ⇔  D = x − σ·A x
        return x - sigma[:, None] * jnp.dot(x, a.T, precision=jax.lax.Precision.HIGHEST)

    return denoise


def test_mixture_trajectories_are_straight_but_a_rotation_field_is_not(mixture_teacher):
    y, denoise, _ = mixture_teacher
    sigmas = schedules.edm_sigmas(40)
    x0 = 80.0 * jax.random.normal(jax.random.key(1), (16, 2))
    traj = geometry.solve(denoise, x0, sigmas, "heun")
    # The mixture: Heun ends on data points (copies, as for digits) along near-straight lines.
    assert np.all(geometry.nearest_data_distance(traj.samples[-1], y) < 1e-4)
    straight = geometry.quasi_linearity(traj.samples)["max_relative_deviation"]
    # Measured: max deviation 0.086 of the chord (mean 0.015). In 2-D the bend near the end,
    # where the trajectory picks its mode, is a larger share of the chord than in d = 64.
    assert np.all(straight < 0.15) and straight.mean() < 0.03, straight
    # The control: the same solver and measurement on a field that turns by 0.05 rad per unit
    # σ (4 rad from σ = 80 to 0): the trajectories are arcs, far from their chords.
    curved = geometry.solve(_rotation_denoiser(0.05), x0, sigmas, "heun")
    r0 = np.linalg.norm(np.asarray(x0), axis=1)
    # Rotation keeps ‖x‖; Heun's amplification factor per step, 1 + (ωΔσ)⁴/4 in modulus, grows
    # it by 2.5% over the ρ-ladder's long early steps (ωΔσ ≈ 0.5 rad).
    np.testing.assert_allclose(np.linalg.norm(curved.samples[-1], axis=1), r0, rtol=5e-2)
    bent = geometry.quasi_linearity(curved.samples)["max_relative_deviation"]
    assert np.all(bent > 0.3), bent  # an arc of 4 rad: deviation ≈ (1 − cos 2)/(2 sin 2) ≈ 0.77


def test_denoiser_settles_at_reads_the_convergence(digits_trajectories):
    _, trajs = digits_trajectories
    traj = trajs["heun"]
    grid = schedules.get_schedule("cosine", 1000)
    out = geometry.denoiser_settles_at(traj, 0.01, grid)
    ratio = geometry.convergence(traj)["denoised_to_final"].mean(1)
    ratio = ratio / ratio[0]
    sig = np.asarray(traj.sigmas)[:-1]
    below = sig <= out["sigma"]
    assert np.all(ratio[below] <= 0.01) and ratio[~below][-1] > 0.01
    assert 0 <= out["t"] < 1000 and out["t_over_T"] == out["t"] / 1000


# --- The job and input checks ------------------------------------------------------------------


def test_run_geometry_writes_summary_and_plots(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    config = importlib.import_module("configs.digits").get_config()
    stub = {"optimal": {"rmse": {}}}
    monkeypatch.setattr(
        geometry.comparison, "compare_schedules", lambda *a, **k: dict(stub, options=k)
    )
    summary = geometry.run_geometry(
        config,
        str(tmp_path),
        num_trajectories=4,
        num_steps=6,
        schedules_comparison=True,
        comparison_options={"nfes": (3,)},
    )
    assert summary["schedules"]["options"] == {"params": None, "nfes": (3,)}
    out = tmp_path / "geometry"
    for name in ("chord_deviation", "convergence", "trajectories_pca", "curvature"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert "model" not in on_disk  # no checkpoint in tmp_path
    opt = on_disk["optimal"]
    assert len(opt["sigmas"]) == 7
    assert set(opt["finite_differences"]) == set(geometry.SOLVERS)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    lines = [r.getMessage() for r in caplog.records if r.name == "absl"]
    assert "geometry trajectories: started, 16 traj to do." in lines  # 4 solvers × 4
    assert any(m.startswith("geometry trajectories: done, 16/16 traj (100.0%)") for m in lines)


@pytest.mark.usefixtures("fake_gcs")  # gs://<bucket>/<key> is tmp_path/gcs/<bucket>/<key>
def test_run_geometry_writes_a_remote_workdir(tmp_path):
    config = importlib.import_module("configs.digits").get_config()
    summary = geometry.run_geometry(
        config, "gs://bucket/run", num_trajectories=2, num_steps=4, solvers=("heun",)
    )
    out = tmp_path / "gcs" / "bucket" / "run" / "geometry"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert sorted(p.name for p in out.iterdir()) == [
        "chord_deviation.png",
        "convergence.png",
        "curvature.png",
        "summary.json",
        "trajectories_pca.png",
    ]
    assert not list((tmp_path / "cwd").iterdir())  # nothing went through the local filesystem


def test_run_geometry_measures_a_model_on_its_own_timestep_grid(tmp_path, conv_denoiser):
    from ddpm_bs import state

    config = importlib.import_module("configs.digits").get_config()
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = state.build_model(config).init(jax.random.key(0), x, t, None, train=False)["params"]
    summary = geometry.run_geometry(
        config, str(tmp_path), params=params, num_trajectories=2, num_steps=5, solvers=("heun",)
    )
    schedule = schedules.get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    model = summary["model"]
    np.testing.assert_array_equal(
        model["sigmas"], geometry.snap_sigmas(schedules.edm_sigmas(5), schedule)
    )
    assert model["checkpoint_step"] is None  # the params given, not a checkpoint's
    assert model["finite_differences"]["heun"]["max_rel_error"] < 1e-5
    settles = model["denoiser_settles_at"]
    assert settles["sigma"] is None or settles["sigma"] in model["sigmas"]


def test_compare_schedules_on_the_optimal_denoiser(tmp_path):
    config = importlib.import_module("configs.digits").get_config()
    comp = geometry.compare_schedules(
        config,
        str(tmp_path),
        nfes=(3, 5),
        denoisers=("optimal",),
        num_fit=2,
        num_eval=4,
        num_fid=0,
        teacher_stride=40,
        num_candidates=8,
    )
    assert comp["num_steps"] == [2, 3] and comp["nfe_used"] == [3, 5]
    opt = comp["optimal"]
    assert set(opt["rmse"]) == {"edm_rho7", "uniform_t", "dp", "dp_sigma_min"}
    assert all(
        lad[-2] == opt["ladders"]["edm_rho7"][0][-2] for lad in opt["ladders"]["dp_sigma_min"]
    )
    for name, ladders in opt["ladders"].items():
        assert [len(lad) for lad in ladders] == [3, 4], name
        assert all(lad[-1] == 0.0 for lad in ladders)
    # The DP minimises the fit cost over the ladders of its candidate grid.
    pairs = zip(opt["fit_cost"]["dp"], opt["fit_cost"]["edm_rho7"], strict=True)
    assert all(dp <= edm + 1e-9 for dp, edm in pairs)
    assert (tmp_path / "geometry" / "schedules.png").read_bytes()[:4] == b"\x89PNG"


def test_the_comparison_solves_each_ladder_with_its_own_coefficients():
    """Ladders of one layout share a compiled solver; each must still be solved as itself."""
    denoise = geometry.gaussian_denoiser(0.3, 0.5)
    run = geometry.comparison._compiled_solve(denoise)
    x = 80.0 * jax.random.normal(jax.random.key(0), (3, 2))
    ladders = (schedules.edm_sigmas(4), np.array([80.0, 10.0, 1.0, 0.1, 0.0], np.float32))
    for method in geometry.SOLVERS:
        for sigmas in ladders:
            got = run(x, sigmas, method=method)
            solve = functools.partial(geometry.solve, denoise, sigmas=sigmas, method=method)
            want = jax.jit(solve)(x)
            np.testing.assert_array_equal(got.sigmas, want.sigmas)
            np.testing.assert_allclose(got.samples, want.samples, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument(points):
    x, y = points
    for bad in (0.0, -1.0, np.array([1.0] * 7 + [0.0])):
        with pytest.raises(ValueError, match="sigma"):
            geometry.optimal_denoiser(x, bad, y)
    with pytest.raises(ValueError, match="sigma"):
        geometry.optimal_denoiser(x, np.ones(3), y)
    with pytest.raises(ValueError, match="data"):
        geometry.optimal_denoiser(x, 1.0, y[:, :8])
    with pytest.raises(ValueError, match="data"):
        geometry.optimal_denoiser(x, 1.0, y[:0])
    with pytest.raises(ValueError, match="chunk_size"):
        geometry.optimal_denoiser(x, 1.0, y, chunk_size=0)
    with pytest.raises(ValueError, match="sigmas"):
        geometry.solve(geometry.gaussian_denoiser(0.0, 1.0), x, [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="method"):
        geometry.solve(geometry.gaussian_denoiser(0.0, 1.0), x, [1.0, 0.0], "rk4")
