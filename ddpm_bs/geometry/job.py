"""mode=geometry: the ODE geometry of `config.data` and of a trained model, as JSON and plots.

`run_geometry` solves the PF-ODE (`trajectories.solve`) with the optimal denoiser of the data
set and, when the workdir has a checkpoint, with the trained model (`denoisers`), measures the
trajectories (`measures`), optionally compares few-step σ ladders (`comparison`), and writes
`<workdir>/geometry/` (summary.json, chord_deviation.png, convergence.png,
trajectories_pca.png, curvature.png) through etils.epath, so the workdir may be remote.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ddpm_bs import artifacts, schedules
from ddpm_bs import data as data_lib
from ddpm_bs import progress as progress_lib
from ddpm_bs.geometry import comparison, denoisers, measures, trajectories

_GEOMETRY_STREAM = 0x6E0  # fold_in constant: the geometry noise is its own stream of config.seed


def run_geometry(
    config,
    workdir: str,
    *,
    params: Any = None,
    num_trajectories: int = 16,
    num_steps: int = 18,
    solvers: Sequence[str] = trajectories.SOLVERS,
    chunk_size: int | None = denoisers.DEFAULT_CHUNK,
    schedules_comparison: bool = False,
    comparison_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measures the ODE geometry on `config.data` and writes `<workdir>/geometry/`.

    Solves the PF-ODE (1) on EDM's ρ-ladder (`schedules.edm_sigmas(num_steps)`, σ from 80 to
    0.002, then 0) from `num_trajectories` noises σ_0·n, n drawn from `config.seed`, with

    * the optimal denoiser of the whole data set (`data.load_all`), and
    * the trained model, when `params` is given or `<workdir>/checkpoints` holds a
      checkpoint (its first EMA params), wrapped by `denoisers.model_denoiser` on the ladder
      snapped to its timestep grid (`denoisers.snap_sigmas`).

    The measurements (quasi-linearity, convergence, curvature) use Heun's trajectories (EDM's
    sampler); the finite-difference identities are checked for every solver in `solvers`.
    With a model, `measures.denoiser_settles_at` (1% threshold) is read off its Heun trajectory.
    With `schedules_comparison`, also runs `comparison.compare_schedules` (keyword overrides in
    `comparison_options`; slow: minutes on a CPU), puts its dict under `schedules`, replaces
    the model's `denoiser_settles_at` by the one measured on the fine teacher, and plots
    schedules.png.
    Writes summary.json (the returned dict) and chord_deviation.png, convergence.png,
    trajectories_pca.png, curvature.png, each atomically.

    Returns:
      The summary: per denoiser, JSON-able numbers (lists indexed like `sigmas`).
    """
    if not isinstance(num_trajectories, int) or num_trajectories < 1:
        raise ValueError(f"num_trajectories must be a positive integer, got {num_trajectories!r}.")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer ≥ 2, got {num_steps!r}.")
    unknown = [s for s in solvers if s not in trajectories.SOLVERS]
    if unknown or "heun" not in solvers:
        raise ValueError(
            f"solvers must be a subset of {trajectories.SOLVERS} that includes 'heun', got {tuple(solvers)}."
        )
    spec = data_lib.DataSpec.from_config(config.data)
    images = np.asarray(data_lib.load_all(spec), np.float32)  # [n, H, W, C]
    shape = images.shape[1:]
    sigmas = schedules.edm_sigmas(num_steps)
    key = jax.random.fold_in(jax.random.key(config.seed), _GEOMETRY_STREAM)
    noise = jax.random.normal(key, (num_trajectories, *shape), jnp.float32)
    out_dir = epath.Path(workdir) / comparison.OUT_DIR
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {
        "dataset": spec.name,
        "image_shape": list(shape),
        "dimension": int(np.prod(shape)),
        "num_data": int(images.shape[0]),
        "num_trajectories": num_trajectories,
        "num_steps": num_steps,
        "seed": int(config.seed),
        "sigma_ladder": {
            "kind": "edm",
            "sigma_min": schedules.SIGMA_MIN,
            "sigma_max": schedules.SIGMA_MAX,
            "rho": schedules.RHO,
        },
        "data_nearest_neighbour_distance_median": float(
            np.median(measures.data_nn_distance(images, max_points=2000))
        ),
    }
    data_dev = jnp.asarray(images)

    @functools.partial(jax.jit, static_argnames="method")
    def optimal_solve(x_init, data, method):
        denoise = functools.partial(denoisers.optimal_denoiser, data=data, chunk_size=chunk_size)
        return trajectories.solve(denoise, x_init, sigmas, method)

    runs = {"optimal": lambda m: optimal_solve(noise * float(sigmas[0]), data_dev, method=m)}
    model_params, checkpoint_step = denoisers.model_params(config, workdir, params)
    if model_params is not None:
        schedule = schedules.get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
        model_sigmas = denoisers.snap_sigmas(sigmas, schedule)
        num_classes = config.model.num_classes
        labels = (
            jnp.arange(num_trajectories, dtype=jnp.int32) % num_classes if num_classes else None
        )

        @functools.partial(jax.jit, static_argnames="method")
        def model_solve(params, x_init, method):
            denoise = denoisers.model_denoiser(config, params, labels)
            return trajectories.solve(denoise, x_init, model_sigmas, method)

        x_model = noise * float(model_sigmas[0])
        runs["model"] = lambda m: model_solve(model_params, x_model, method=m)

    solved: dict[str, dict[str, trajectories.Trajectory]] = {name: {} for name in runs}
    total = len(runs) * len(solvers) * num_trajectories
    with progress_lib.Progress("geometry trajectories", total=total, unit="traj") as bar:
        for name, run in runs.items():
            for m in solvers:
                solved[name][m] = jax.block_until_ready(run(m))
                bar.update(num_trajectories)
    results = {name: _analyse(by_method, images) for name, by_method in solved.items()}
    if model_params is not None:
        results["model"]["checkpoint_step"] = checkpoint_step
        results["model"]["sigma_grid"] = (
            "ladder snapped to the model's timesteps, duplicates merged"
        )
        results["model"]["denoiser_settles_at"] = measures.denoiser_settles_at(
            jax.device_get(solved["model"]["heun"]), 0.01, schedule
        )

    if schedules_comparison:
        compared = comparison.compare_schedules(
            config, workdir, params=model_params, **(comparison_options or {})
        )
        if "model" in compared and "model" in results:
            results["model"]["denoiser_settles_at"] = compared["model"]["denoiser_settles_at"]
        results["schedules"] = compared
    summary.update(results)
    if jax.process_index() == 0:  # every process computes the same numbers; one writes them
        artifacts.write_json(summary, os.fspath(out_dir / "summary.json"))
        _plot_all({name: by_method["heun"] for name, by_method in solved.items()}, out_dir)
        logging.info("Wrote the geometry summary and plots to %s", out_dir)
    return summary


def _analyse(solved: dict[str, trajectories.Trajectory], images: np.ndarray) -> dict[str, Any]:
    """JSON-able measurements of one denoiser's trajectories (Heun's for the geometry)."""
    traj = jax.device_get(solved["heun"])
    lin = measures.quasi_linearity(traj.samples)
    conv = measures.convergence(traj)
    curv = measures.curvature(traj, "heun")
    nearest = measures.nearest_data_distance(np.asarray(traj.samples[-1]), images)
    return {
        "sigmas": np.asarray(traj.sigmas, np.float64).tolist(),
        "quasi_linearity": {
            "max_relative_deviation_mean": float(lin["max_relative_deviation"].mean()),
            "max_relative_deviation_max": float(lin["max_relative_deviation"].max()),
            "mean_relative_deviation_mean": float(lin["mean_relative_deviation"].mean()),
            "chord_length_mean": float(lin["chord_length"].mean()),
            "relative_deviation_per_sigma": lin["relative_deviation"].mean(axis=1).tolist(),
            "deviation_per_sigma": lin["deviation"].mean(axis=1).tolist(),
            "deviation_over_remaining_per_sigma": lin["deviation_over_remaining"]
            .mean(axis=1)
            .tolist(),
            "pca_explained_variance_mean": lin["pca_explained_variance"].mean(axis=0).tolist(),
        },
        "convergence": {
            "sample_to_final_per_sigma": conv["sample_to_final"].mean(axis=1).tolist(),
            "denoised_to_final_per_sigma": conv["denoised_to_final"].mean(axis=1).tolist(),
            "denoised_over_sample_ratio_per_sigma": conv["ratio"].tolist(),
        },
        "curvature": {
            "mean_turn_angle_deg_per_point": curv["mean_turn_angle_deg"].tolist(),
            "pearson_turn_vs_relative_denoised_change": curv["pearson"],
            "spearman_turn_vs_relative_denoised_change": curv["spearman"],
            "identity_max_error_deg": curv["identity_max_error_deg"],
            "raw_denoised_max_error_deg": curv["raw_denoised_max_error_deg"],
        },
        "finite_differences": {
            m: trajectories.finite_difference_check(jax.device_get(t), m) for m, t in solved.items()
        },
        "final_samples": {  # the optimal denoiser can only reproduce training points
            "nearest_data_distance_median": float(np.median(nearest)),
            "nearest_data_distance_max": float(nearest.max()),
        },
    }


def _plot_all(heun: dict[str, trajectories.Trajectory], out_dir: epath.Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    colors = {"optimal": "tab:blue", "model": "tab:orange"}
    labels = {"optimal": "optimal denoiser", "model": "trained model"}

    # 1. Deviation from the chord vs σ.
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, traj in heun.items():
        sig = np.asarray(traj.sigmas)[:-1]
        rel = measures.quasi_linearity(jax.device_get(traj.samples))["relative_deviation"][:-1]
        ax.plot(
            sig, rel.mean(axis=1), "-o", ms=3, color=colors[name], label=f"{labels[name]} (mean)"
        )
        ax.fill_between(sig, rel.min(axis=1), rel.max(axis=1), color=colors[name], alpha=0.2)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("σ (sampling runs right)")
    ax.set_ylabel("‖x_σ − chord‖ / chord length")
    ax.set_title("Quasi-linear sampling trajectories")
    ax.legend()
    fig.tight_layout()
    artifacts.save_figure(fig, os.fspath(out_dir / "chord_deviation.png"))

    # 2. Distance to the final sample vs σ.
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, traj in heun.items():
        sig = np.asarray(traj.sigmas)[:-1]
        conv = measures.convergence(jax.device_get(traj))
        ax.plot(
            sig,
            conv["sample_to_final"][:-1].mean(axis=1),
            "-o",
            ms=3,
            color=colors[name],
            label=f"{labels[name]}: x_σ",
        )
        ax.plot(
            sig,
            conv["denoised_to_final"].mean(axis=1),
            "--s",
            ms=3,
            color=colors[name],
            label=f"{labels[name]}: D(x_σ; σ)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("σ (sampling runs right)")
    ax.set_ylabel("distance to the final sample")
    ax.set_title("The denoising trajectory converges first")
    ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, os.fspath(out_dir / "convergence.png"))

    # 3. 2-D PCA projection of a few trajectories.
    traj = jax.device_get(next(iter(heun.values())))
    name = next(iter(heun))
    num = min(4, traj.samples.shape[1])
    fig = Figure(figsize=(3.2 * num, 3.4))
    for b in range(num):
        ax = fig.add_subplot(1, num, b + 1)
        x = measures.flatten(traj.samples[:, b], 1)
        d = measures.flatten(traj.denoised[:, b], 1)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        basis = vt[:2].T if vt.shape[0] >= 2 else np.eye(x.shape[1])[:, :2]
        px, pd = (x - mean) @ basis, (d - mean) @ basis
        ax.plot(px[:, 0], px[:, 1], "-o", ms=3, color=colors[name], label="x_σ")
        ax.plot(pd[:, 0], pd[:, 1], "--s", ms=3, color="tab:green", label="D(x_σ; σ)")
        ax.plot(px[0, 0], px[0, 1], "k^", label="σ_max")
        ax.plot(px[-1, 0], px[-1, 1], "r*", ms=10, label="final")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(f"trajectory {b}", fontsize=9)
        if b == 0:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{labels[name]}: trajectories on their top-2 principal directions (axes not to scale)",
        fontsize=10,
    )
    fig.tight_layout()
    artifacts.save_figure(fig, os.fspath(out_dir / "trajectories_pca.png"))

    # 4. Turn of the sampling trajectory vs change of the denoising output.
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    for name, traj in heun.items():
        curv = measures.curvature(jax.device_get(traj), "heun")
        ax.scatter(
            curv["relative_denoised_change"].ravel(),
            curv["turn_angle_deg"].ravel(),
            s=6,
            color=colors[name],
            label=f"{labels[name]} (Spearman {curv['spearman']:.2f})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("‖D_i − D_{i−1}‖ / ‖x_i − D_i‖")
    ax.set_ylabel("turn angle of x_σ at step i (degrees)")
    ax.set_title("Curvature follows the denoising trajectory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, os.fspath(out_dir / "curvature.png"))
