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
from jax.sharding import Mesh

from ddpm_bs import artifacts, checkpointing, sampling, state


def restore_ema_params(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None, rate_index: int = 0
):
    """The EMA params (of `train.ema_rates[rate_index]`) of the workdir's latest checkpoint, and
    its step."""
    root = workdir if artifacts.is_remote(workdir) else os.path.abspath(workdir)
    directory = os.path.join(root, "checkpoints")
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(
            f"--workdir={workdir} has no checkpoints/ to sample from: train there first, or point "
            "--workdir at a run directory."
        )
    abstract = state.abstract_state_of(config, workdir, mesh)
    ckpt = checkpointing.Checkpoints(workdir, asynchronous=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint.")
        restored, _ = ckpt.restore(abstract)
    finally:
        ckpt.close()
    return restored.ema_params[rate_index], int(restored.step)


def draw(config: ml_collections.ConfigDict, workdir: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Draws `config.sample.num_samples` images from the workdir's latest EMA params.

    Returns uint8 images [N, H, W, C], int32 labels [N] (empty when unconditional) and the
    checkpoint's step; writes nothing. The images are drawn as in-training grids and
    evaluations are (`sampling.draw_images`), from the run's sample key.
    """
    spec = sampling.SampleSpec.from_config(config.sample)
    mesh = state.build_mesh(config)
    params, step = restore_ema_params(config, workdir, mesh)
    images, labels = sampling.draw_images(
        spec,
        state.build_model(config),
        params,
        mesh,
        state.build_schedule(config),
        (config.data.image_size, config.data.image_size, config.data.channels),
        state.run_keys(config.seed).sample,
        target=config.loss.target,
        learn_sigma=config.model.learn_sigma,
        num_classes=config.model.num_classes,
    )
    return images, labels, step


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples `config.sample.num_samples` images; returns the path of the .npz written."""
    sc = config.sample
    eps_scale = sampling.SampleSpec.from_config(sc).eps_scale
    images, labels, step = draw(config, workdir)
    out_dir = os.path.join(workdir, "samples")
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    name = f"{sc.method}{sc.steps}"
    if eps_scale:
        name += "_es{:g}_{:g}".format(*eps_scale)  # beside the unscaled set, not over it
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
