"""Few-step σ ladders compared: EDM's ρ = 7, uniform-in-t and the DP ladders, per NFE budget.

`compare_schedules` fits `ladders.dp_schedule` to fine teacher trajectories of the trained
model and of the optimal denoiser, then scores every ladder on held-out noises by the RMSE of
its final samples to the teacher's (and by digits FID when `evaluation.digits_fid` runs), and
plots `<workdir>/geometry/schedules.png`.
"""

from __future__ import annotations

import dataclasses
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
from ddpm_bs.geometry import denoisers as denoisers_lib
from ddpm_bs.geometry import ladders as ladders_lib
from ddpm_bs.geometry import measures, trajectories

OUT_DIR = "geometry"  # under the workdir
_COMPARISON_STREAM = 0x6E1  # fold_in constant: the comparison's noises, a stream of config.seed


def _fid_fn():
    """`evaluation.digits_fid` if it exists and runs (its feature weights are present)."""
    try:
        from ddpm_bs import evaluation  # optional: FID is skipped without it
    except ImportError:
        return None
    fid = getattr(evaluation, "digits_fid", None)
    if fid is None:
        return None
    try:
        fid(np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    except (OSError, ValueError) as e:  # e.g. the feature weights are not built yet
        logging.warning("digits FID unavailable (%s); reporting RMSE only.", e)
        return None
    return fid


def compare_schedules(
    config,
    workdir: str,
    nfes: Sequence[int] = (4, 5, 6, 8, 10),
    *,
    params: Any = None,
    solver: str = "heun",
    denoisers: Sequence[str] = ("model", "optimal"),
    num_fit: int = 16,
    num_eval: int = 64,
    num_fid: int = 500,
    teacher_stride: int = 2,
    num_candidates: int = 64,
    window: int | None = None,
    chunk_size: int | None = denoisers_lib.DEFAULT_CHUNK,
    plot: bool = True,
) -> dict[str, Any]:
    """EDM's ρ = 7 ladder vs uniform-in-t vs `dp_schedule` at each NFE budget, on one σ grid.

    'dp' is the free DP ladder; 'dp_sigma_min' is forced to end σ_min → 0 as EDM's does.

    The σ grid is the model's VP timestep grid (`config.diffusion`): every ladder is put on it
    (`denoisers.snap_sigmas`), from the level nearest σ_max = 80 (t_max) down to σ_0, then 0. The
    teacher is Heun on every `teacher_stride`-th grid level of that range. For each denoiser
    (the trained model via `denoisers.model_denoiser`, and the optimal denoiser of the data):

    1. `num_fit` teacher trajectories fit the DP (`ladders.step_costs`, once per denoiser);
    2. `num_eval` other noises (held out) give the teacher's final samples, and every ladder
       is scored by the RMSE (per pixel, over the held-out batch) of its final samples to
       them;
    3. when `ddpm_bs.evaluation.digits_fid` exists, `num_fid` samples per ladder get a
       digits FID (`num_fid = 0` skips it).

    Budgets map to steps by `ladders.nfe_to_steps` (Heun: NFE = 2K − 1); `nfe_used` reports the calls
    actually made. Noises come from `config.seed` in their own stream. Writes
    `<workdir>/geometry/schedules.png` (RMSE vs NFE) when `plot`.

    A ladder whose samples overflow (EDM's ρ = 7 with Heun at K ≤ 3 jumps from σ = 80 to
    σ ≈ 0.01 in one step, and the Heun corrector explodes) gets RMSE/FID NaN (null in JSON).

    Returns:
      JSON-able dict: per denoiser, ladders and rmse/fid per schedule, indexed like `nfes`;
      for the model also `measures.denoiser_settles_at` measured on the teacher.
    """
    nfes = [int(n) for n in nfes]
    steps = [ladders_lib.nfe_to_steps(n, solver) for n in nfes]
    spec = data_lib.DataSpec.from_config(config.data)
    images = np.asarray(data_lib.load_all(spec), np.float32)
    if images.shape[0] < 1:
        raise ValueError(f"data set {spec.name!r} is empty: the data has shape {images.shape}.")
    shape = images.shape[1:]
    schedule = schedules.get_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    grid = np.asarray(schedule.sigmas, np.float64)
    t_max = int(np.argmin(np.abs(np.log(grid) - np.log(schedules.SIGMA_MAX))))
    teacher_t = np.unique(np.append(np.arange(t_max, -1, -teacher_stride), 0))[::-1]
    teacher_sigmas = np.append(grid[teacher_t], 0.0).astype(np.float32)
    key = jax.random.fold_in(jax.random.key(config.seed), _COMPARISON_STREAM)
    k_fit, k_eval, k_fid = jax.random.split(key, 3)
    sigma_max = float(teacher_sigmas[0])
    x_fit = sigma_max * jax.random.normal(k_fit, (num_fit, *shape), jnp.float32)
    x_eval = sigma_max * jax.random.normal(k_eval, (num_eval, *shape), jnp.float32)
    x_fid = sigma_max * jax.random.normal(k_fid, (max(num_fid, 1), *shape), jnp.float32)
    fid = _fid_fn() if num_fid > 0 else None

    ladders_by_k = {
        "edm_rho7": {
            k: denoisers_lib.snap_sigmas(schedules.edm_sigmas(k), schedule) for k in set(steps)
        },
        "uniform_t": {k: ladders_lib.uniform_t_sigmas(schedule, k, t_max) for k in set(steps)},
    }
    denoise_fns: dict[str, denoisers_lib.Denoiser] = {}
    if "optimal" in denoisers:
        data_dev = jnp.asarray(images)
        denoise_fns["optimal"] = functools.partial(
            denoisers_lib.optimal_denoiser, data=data_dev, chunk_size=chunk_size
        )
    if "model" in denoisers and config.model.num_classes:
        logging.warning("compare_schedules: class-conditional models are not supported; skipped.")
    elif "model" in denoisers:
        model_params, _ = denoisers_lib.model_params(config, workdir, params)
        if model_params is not None:
            denoise_fns["model"] = denoisers_lib.model_denoiser(config, model_params)

    result: dict[str, Any] = {
        "solver": solver,
        "nfe_budget": nfes,
        "num_steps": steps,
        "nfe_used": [ladders_lib.steps_to_nfe(k, solver) for k in steps],
        "teacher": {"solver": "heun", "num_steps": int(teacher_sigmas.size - 1)},
        "grid_t_max": t_max,
        "num_fit": num_fit,
        "num_eval": num_eval,
        "num_fid": num_fid if fid is not None else 0,
        "fid_available": fid is not None,
        "objective": "summed local truncation error of single steps from teacher states",
    }
    num_ladders = len(denoise_fns) * (len(ladders_by_k) + 2) * len(steps)  # + the two DP ones
    with progress_lib.Progress("schedule comparison", total=num_ladders, unit="ladder") as bar:
        for name, denoise in denoise_fns.items():
            run = _compiled_solve(denoise)
            teacher_fit = jax.device_get(run(x_fit, teacher_sigmas, method="heun"))
            teacher_eval = np.asarray(run(x_eval, teacher_sigmas, method="heun").samples[-1])
            costs = ladders_lib.step_costs(
                teacher_fit,
                denoise=denoise,
                solver=solver,
                num_candidates=num_candidates,
                window=window,
            )
            ladders = dict(ladders_by_k)
            ladders["dp"] = {k: costs.sigmas[ladders_lib.dp_path(costs, k)[0]] for k in set(steps)}
            ladders["dp_sigma_min"] = {
                k: costs.sigmas[ladders_lib.dp_path(costs, k, through_sigma_min=True)[0]]
                for k in set(steps)
            }
            out: dict[str, Any] = {"ladders": {}, "rmse": {}, "fit_cost": {}}
            if fid is not None:
                out["fid"] = {}
            for sched, by_k in ladders.items():
                out["ladders"][sched] = [np.asarray(by_k[k], np.float64).tolist() for k in steps]
                out["fit_cost"][sched] = [
                    ladders_lib.path_cost(costs, ladders_lib.snap_to_candidates(by_k[k], costs))
                    for k in steps
                ]
                rmse, fids = [], []
                for k in steps:
                    lad = np.asarray(by_k[k], np.float32)
                    final = np.asarray(run(x_eval, lad, method=solver).samples[-1])
                    rmse.append(float(np.sqrt(np.mean(np.square(final - teacher_eval)))))
                    if fid is not None:
                        imgs = np.asarray(run(x_fid, lad, method=solver).samples[-1])
                        finite = np.all(np.isfinite(imgs))  # a diverged ladder gets no FID
                        fids.append(float(fid(np.clip(imgs, -1, 1))) if finite else float("nan"))
                    bar.update(1)
                out["rmse"][sched] = rmse
                if fid is not None:
                    out["fid"][sched] = fids
            if fid is not None:
                out["fid_teacher"] = float(
                    fid(
                        np.clip(
                            np.asarray(run(x_fid, teacher_sigmas, method="heun").samples[-1]), -1, 1
                        )
                    )
                )
            if name == "model":
                out["denoiser_settles_at"] = measures.denoiser_settles_at(
                    teacher_fit, 0.01, schedule
                )
            result[name] = out
            logging.info("Schedules for %s: %s", name, out["rmse"])
    if plot and jax.process_index() == 0:
        out_dir = epath.Path(workdir) / OUT_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        _plot_schedules(result, os.fspath(out_dir / "schedules.png"))
    return result


def _plot_schedules(result: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure

    names = [n for n in ("model", "optimal") if n in result]
    if not names:
        return
    fig = Figure(figsize=(5.2 * len(names), 4))
    for a, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), a + 1)
        styles = (("edm_rho7", "-o"), ("uniform_t", "-s"), ("dp", "-^"), ("dp_sigma_min", "--v"))
        for sched, style in styles:
            ax.plot(result["nfe_used"], result[name]["rmse"][sched], style, ms=4, label=sched)
        ax.set_yscale("log")
        ax.set_xlabel(f"NFE ({result['solver']})")
        ax.set_ylabel("RMSE to the teacher's final samples")
        ax.set_title({"model": "trained model", "optimal": "optimal denoiser"}[name])
        ax.legend()
    fig.tight_layout()
    artifacts.save_figure(fig, path)


def _compiled_solve(denoise: denoisers_lib.Denoiser):
    """run(x, sigmas, method=...) -> `trajectories.solve`'s Trajectory, with one compile per plan
    layout (method, number of levels, whether the ladder ends at 0), not per ladder: the
    ladder's coefficients are arguments of the compiled function.
    """
    compiled = {}

    def run(x: jax.Array, sigmas: Any, *, method: str) -> trajectories.Trajectory:
        ladder = np.asarray(trajectories.check_ladder(sigmas), np.float64)
        plan, levels = trajectories.ladder_plan(ladder, method)
        layout = (plan.timesteps.tobytes(), plan.slot.tobytes(), plan.rebase.tobytes())
        if layout not in compiled:
            compiled[layout] = jax.jit(functools.partial(_solve_with, denoise, plan))
        return compiled[layout](x, levels, plan.base_coef, plan.pred_coef)

    return run


def _solve_with(denoise, template, x, levels, base_coef, pred_coef) -> trajectories.Trajectory:
    plan = dataclasses.replace(template, base_coef=base_coef, pred_coef=pred_coef)
    return trajectories.solve_plan(denoise, x, plan, levels)
