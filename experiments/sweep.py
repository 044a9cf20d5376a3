"""Runs one experiment of `experiments/specs.py`; resumable; a JSON line per finished run.

    python -m experiments.sweep speedup --size=cpu       # or: all, ot_decay, samplers, ...
    python -m experiments.sweep laws_weighted --size=cpu --law=ot_gap   # default: BEST_LAW
    python -m experiments.sweep laws --size=cpu --only='cosine/uniform/*'  # some runs only

Results go to `<out>/<experiment>.jsonl` (default out: experiments/results/<size>). Each
training run trains in `<out>/runs/<hash of its config>` with `ddpm_bs.train`, so runs that
two experiments share (the uniform and BS baselines) train once, and an interrupted run
resumes from its checkpoint. Rerun the same command after an interruption: finished runs are
skipped. SIGTERM or Ctrl-C ends the current training step with a checkpoint, as in ddpm-bs.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from ddpm_bs import artifacts, evaluation, generate, interval, train, validate
from experiments import specs

ROOT = pathlib.Path(__file__).resolve().parent


class Stopped(Exception):
    """A training run stopped before its last step (SIGTERM, Ctrl-C): rerun to resume."""


def device() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU, {os.cpu_count()} cores"
    return f"{jax.device_count()}× {d.device_kind}"


def workdir_for(config: Any, out: pathlib.Path, kind: str = "runs") -> pathlib.Path:
    """`<out>/<kind>/<12 hex digits>`: one directory per distinct config."""
    text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
    return out / kind / hashlib.sha256(text.encode()).hexdigest()[:12]


def _add_wall(workdir: pathlib.Path, seconds: float) -> float:
    """Adds a segment's seconds to `<workdir>/sweep_wall.json`; returns the total."""
    path = workdir / "sweep_wall.json"
    total = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    artifacts.write_json({"seconds": total + seconds}, str(path))
    return total + seconds


def train_run(run: specs.Run, size: specs.Size, out: pathlib.Path) -> dict[str, Any]:
    """Trains `run` unless done; returns its record (FID curve, wall time, device)."""
    config = run.config(size)
    workdir = workdir_for(config, out)
    done = workdir / "sweep_done.json"
    if not done.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        _say(f"training {run.name} in {workdir}")
        start = time.perf_counter()
        state = train.train_and_evaluate(config, str(workdir))
        wall = _add_wall(workdir, time.perf_counter() - start)
        if int(state.step) < config.train.num_steps:
            raise Stopped(f"{run.name} stopped at step {int(state.step)}")
        artifacts.write_json({"wall_s": wall, "device": device(), "finished": _now()}, str(done))
    info = json.loads(done.read_text())
    metrics = artifacts.read_metrics(workdir)
    curve = metrics.get("eval/digits_fid", np.zeros((0, 2)))
    loss = metrics.get("loss", np.zeros((0, 2)))
    best = int(np.argmin(curve[:, 1])) if len(curve) else None
    t_delta = None  # only the Bernoulli sampler has a t_δ
    if config.timesteps.sampler == "bernoulli":
        t_delta = config.timesteps.t_delta
        if t_delta == "auto":
            t_delta = interval.load_t_delta(str(workdir))
    return {
        "kind": "train",
        "seed": int(config.seed),
        "workdir": str(workdir.relative_to(out)),
        "steps": int(config.train.num_steps),
        "batch_size": int(config.train.batch_size),
        "image_size": int(config.data.image_size),
        "eval_samples": int(config.train.eval_samples),
        "eval_sampler": f"ddim{config.train.sample_steps}",
        "t_delta": t_delta,
        "curve": {"step": curve[:, 0].astype(int).tolist(), "digits_fid": curve[:, 1].tolist()},
        "best_fid": float(curve[best, 1]) if best is not None else None,
        "best_step": int(curve[best, 0]) if best is not None else None,
        "final_fid": float(curve[-1, 1]) if len(curve) else None,
        "final_loss": float(loss[-1, 1]) if len(loss) else None,
        **info,
    }


def sample_run(run: specs.Run, size: specs.Size, out: pathlib.Path) -> dict[str, Any]:
    """Scores the final EMA of `run.train` (trained first if needed) with one sampler."""
    trained = train_run(run.train, size, out)
    config = run.config(size)
    start = time.perf_counter()
    images, _, step = generate.draw(config, str(out / trained["workdir"]))
    fid = evaluation.digits_fid(images)
    return {
        "kind": "sample",
        "train_run": run.train.name,
        "train_workdir": trained["workdir"],
        "train_step": step,
        "method": config.sample.method,
        "steps": int(config.sample.steps),
        "eps_scale": [config.sample.eps_scale_k, config.sample.eps_scale_b],
        "num_samples": int(config.sample.num_samples),
        "digits_fid": fid,
        "wall_s": time.perf_counter() - start,
        "device": device(),
        "finished": _now(),
    }


def locate_run(run: specs.Run, size: specs.Size, out: pathlib.Path) -> dict[str, Any]:
    """The W₂ curve of two digit classes and the t_δ located on it (mode=locate)."""
    config = run.config(size)
    workdir = workdir_for(config, out, "locate")
    start = time.perf_counter()
    result = interval.run_locate(config, str(workdir), progress=False)
    curve = result["curve"]
    return {
        "kind": "locate",
        "workdir": str(workdir.relative_to(out)),
        "schedule": result["schedule"],
        "sets": [result["data"]["set_a"], result["data"]["set_b"]],
        "num_images": [result["data"]["num_a"], result["data"]["num_b"]],
        "image_shape": result["data"]["image_shape"],
        "t_delta": result["t_delta"],
        "fraction": result["fraction"],
        "decay_rate": result["decay_rate"],
        "t_delta_from_rate": result["t_delta_from_rate"],
        "timesteps": curve["timesteps"],
        "s": curve["s"],
        "ratio": curve["ratio"],
        "naive_ratio": curve["naive_ratio"],
        "wall_s": time.perf_counter() - start,
        "device": device(),
        "finished": _now(),
    }


KINDS = {"train": train_run, "sample": sample_run, "locate": locate_run}


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def results_path(out: pathlib.Path, experiment: str) -> pathlib.Path:
    return out / f"{experiment}.jsonl"


def run_experiment(
    experiment: str,
    size: str,
    out: pathlib.Path,
    law: str | None = None,
    only: str | None = None,
) -> list[dict[str, Any]]:
    """Runs what is missing of `experiment` at `size`; returns all its records in order.

    `law` is the law `laws_weighted` combines with the weightings (default specs.BEST_LAW);
    `only`, a shell pattern, keeps the runs whose names match it (a long sweep split up).

    Raises:
      Stopped: a training run was interrupted; its checkpoint is written, rerun to go on.
    """
    if experiment not in specs.EXPERIMENTS:
        raise ValueError(
            f"experiment {experiment!r} is unknown; valid: {', '.join(specs.EXPERIMENTS)}, all."
        )
    if size not in specs.SIZES:
        raise ValueError(f"--size={size!r} is unknown; valid: {', '.join(specs.SIZES)}.")
    spec = specs.SIZES[size]
    params = {"law": law} if law is not None and experiment == "laws_weighted" else {}
    runs = specs.EXPERIMENTS[experiment](spec, **params)
    if only is not None:
        runs = [run for run in runs if fnmatch.fnmatchcase(run.name, only)]
        if not runs:
            raise ValueError(f"--only={only!r} matches no run of {experiment} at --size={size}.")
    for run in runs:  # every config is checked before anything runs (kinds are modes)
        validate.validate_config(run.config(spec), num_devices=jax.device_count(), mode=run.kind)
    out.mkdir(parents=True, exist_ok=True)
    path = results_path(out, experiment)
    records = {r["run"]: r for r in artifacts.read_jsonl(path)}
    for i, run in enumerate(runs):
        if run.name in records:
            continue
        _say(f"[{experiment} {i + 1}/{len(runs)}] {run.name}")
        record = {
            "experiment": experiment,
            "run": run.name,
            "size": size,
            "settings": dict(run.settings),
            **KINDS[run.kind](run, spec, out),
        }
        artifacts.append_jsonl([record], path)
        records[run.name] = record
    return [records[run.name] for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help=f"one of {', '.join(specs.EXPERIMENTS)}, or all")
    parser.add_argument("--size", default="cpu", choices=list(specs.SIZES))
    parser.add_argument("--out", default=None, help="default: experiments/results/<size>")
    parser.add_argument(
        "--law", default=None, help=f"laws_weighted's law (default {specs.BEST_LAW})"
    )
    parser.add_argument("--only", default=None, help="a shell pattern: run only matching runs")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out or ROOT / "results" / args.size)
    names = list(specs.EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    try:
        if args.law is not None and "laws_weighted" not in names:
            raise ValueError(f"--law applies to laws_weighted only, not to {args.experiment}.")
        for name in names:
            records = run_experiment(name, args.size, out, law=args.law, only=args.only)
            print(f"{name}: {len(records)} runs in {results_path(out, name)}", flush=True)
    except Stopped as e:
        print(f"experiments.sweep: {e}; rerun the same command to resume.", file=sys.stderr)
        return 0
    except ValueError as e:  # validate.ConfigError, train.SetupError, an unknown name
        print(f"experiments.sweep: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
