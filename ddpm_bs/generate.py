"""Modes `sample` and `eval`: draw images from a workdir's latest checkpoint (EMA weights) with any sampler.

Writes `<workdir>/samples/<method><steps>_step<N>.npz` (uint8 `images` [N, H, W, C], `labels`)
and a grid PNG of the first 64 beside it. Chunks of `sample.batch_size` are drawn with one
compiled, data-sharded sampler and keys fold_in(sample_key, chunk), so the set is reproducible;
the log shows the images done, the rate and the time left. Workdirs may be local or remote
(`gs://…`): files are read and written through etils.epath, each written atomically
(`artifacts.write_bytes`).
"""

from __future__ import annotations

import io
import json
import logging
import os

import jax
import ml_collections
import numpy as np
from etils import epath

from ddpm_bs import artifacts, checkpointing, progress, sampling, train


def restore_ema_params(trainer: train.Trainer, workdir: str, rate_index: int = 0):
    """The EMA params (of `train.ema_rates[rate_index]`) of the workdir's latest checkpoint."""
    root = workdir if artifacts.is_remote(workdir) else os.path.abspath(workdir)
    directory = os.path.join(root, "checkpoints")
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(
            f"--workdir={workdir} has no checkpoints/ to sample from: train there first, or point "
            "--workdir at a run directory."
        )
    ckpt = checkpointing.Checkpoints(workdir, asynchronous=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint.")
        state, _ = ckpt.restore(trainer.abstract_state)
    finally:
        ckpt.close()
    return state.ema_params[rate_index], int(state.step)


def _eps_scale(sc: ml_collections.ConfigDict) -> tuple[float, float] | None:
    """Epsilon Scaling's (k, b) when sample.method takes it and it is on; else None."""
    k_b = (sc.eps_scale_k, sc.eps_scale_b)
    return k_b if sc.method in ("ddim", "ddpm") and k_b != (0.0, 1.0) else None


def draw(config: ml_collections.ConfigDict, workdir: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Draws `config.sample.num_samples` images from the workdir's latest EMA params.

    Returns uint8 images [N, H, W, C], int32 labels [N] ([0] when unconditional) and the
    checkpoint's step; writes nothing.
    """
    sc = config.sample
    if sc.method not in sampling.METHODS:
        raise ValueError(
            f"sample.method={sc.method!r} is unknown; valid methods: {', '.join(sampling.METHODS)}."
        )
    if sc.num_samples < 1 or sc.batch_size < 1:
        raise ValueError(
            f"sample.num_samples={sc.num_samples} and sample.batch_size={sc.batch_size} must be ≥ 1."
        )
    trainer = train.Trainer(config)
    n_data = trainer.mesh.shape["data"]
    batch = -(-min(sc.batch_size, sc.num_samples) // n_data) * n_data  # round up to the devices
    params, step = restore_ema_params(trainer, workdir)

    def apply_fn(params, x, t, *y):
        return trainer.model.apply({"params": params}, x, t, *y, train=False)

    opts = {
        "steps": sc.steps,
        "target": config.loss.target,
        "learn_sigma": config.model.learn_sigma,
        "clip_denoised": sc.clip_denoised,
    }
    if _eps_scale(sc):
        opts["eps_scale"] = _eps_scale(sc)
    if sc.method in ("dpm_solver", "dpm_solver++"):
        opts["skip_type"] = sc.skip_type
    if sc.method == "ddim":
        opts["eta"] = sc.eta
    fn = sampling.sharded_sampler(
        sc.method,
        apply_fn,
        trainer.mesh,
        config.diffusion.schedule,
        config.diffusion.num_timesteps,
        (batch, *trainer.image_shape),
        **opts,
    )
    num_classes = config.model.num_classes
    images, labels = [], []
    with progress.Progress("sampling", total=sc.num_samples, unit="img") as bar:
        for chunk in range(-(-sc.num_samples // batch)):
            key = jax.random.fold_in(trainer.sample_key, chunk)
            y = None
            if num_classes:
                y = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, num_classes)
                labels.append(np.asarray(y))
            images.append(sampling.to_uint8(fn(params, key, y)))
            bar.update(min(batch, sc.num_samples - chunk * batch))
    images = np.concatenate(images)[: sc.num_samples]
    labels = np.concatenate(labels)[: sc.num_samples] if labels else np.zeros((0,), np.int32)
    return images, labels.astype(np.int32), step


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples `config.sample.num_samples` images; returns the path of the .npz written."""
    sc = config.sample
    images, labels, step = draw(config, workdir)
    out_dir = os.path.join(workdir, "samples")
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    name = f"{sc.method}{sc.steps}"
    if _eps_scale(sc):
        name += "_es{:g}_{:g}".format(*_eps_scale(sc))  # beside the unscaled set, not over it
    stem = os.path.join(out_dir, f"{name}_step{step:08d}")
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, images=images, labels=labels)
        artifacts.write_bytes(buffer.getvalue(), stem + ".npz")
        grid = images[:64]
        factor = max(1, 32 // grid.shape[1])
        artifacts.save_png(
            sampling.image_grid(grid.repeat(factor, axis=1).repeat(factor, axis=2)), stem + ".png"
        )
        logging.info("Wrote %s.npz and %s.png", stem, stem)
    return stem + ".npz"


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Mode `eval`: scores the newest samples .npz in `<workdir>/samples` (`sample.metric`).

    `sample.metric` is one metric or several, comma-separated ('fid,sfid,is'); the Inception
    metrics read `sample.inception_weights`, and fid/sfid `sample.reference_stats`. All of
    them are checked before the samples are read. Appends the result to
    `<workdir>/eval.jsonl` and returns it.
    """
    from ddpm_bs import evaluation

    sc = config.sample
    metrics = evaluation.check_metric_inputs(sc.metric, sc.inception_weights, sc.reference_stats)
    samples = epath.Path(workdir, "samples")
    paths = sorted(samples.glob("*.npz"), key=_mtime) if samples.is_dir() else []
    if not paths:
        raise FileNotFoundError(
            f"no samples in {samples}: run --mode=sample on this workdir first."
        )
    result = evaluation.evaluate_samples(
        os.fspath(paths[-1]),
        metric=metrics,
        inception_weights=sc.inception_weights,
        reference=sc.reference_stats,
    )
    result["samples"] = paths[-1].name
    if jax.process_index() == 0:
        artifacts.append_jsonl([result], os.path.join(workdir, "eval.jsonl"))
    logging.info("%s", json.dumps(result))
    print(json.dumps(result), flush=True)
    return result


def _mtime(path: epath.Path) -> float:
    """Modification time: the local file's, to the nanosecond; a remote object's, to the second
    (what epath's `stat` gives)."""
    return os.path.getmtime(path) if not artifacts.is_remote(path) else path.stat().mtime
