"""The training loop: a pure, sharded train step and the loop around it.

`train_and_evaluate(config, workdir)` is the main job. The step reads top to bottom: per-step
key from (seed, step); timesteps, noise and dropout keys split from it; timesteps drawn by the
configured sampler; x_t by `q_sample`; per-example loss; optional importance weights; gradients
(summed over micro-batches); optax update; EMA; sampler-state update; metrics.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_bs import (
    artifacts,
    checkpointing,
    data,
    diffusion,
    fields,
    losses,
    metric_log,
    preemption,
    sampling,
    schedules,
    sharding,
    timesteps,
    validate,
)
from ddpm_bs import state as state_lib
from ddpm_bs.models import unet

TrainState = state_lib.TrainState


# --- The step --------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    train_key: jax.Array,
    *,
    model: unet.UNet,
    tx: optax.GradientTransformation,
    lr_schedule,
    sampler,
    schedule: schedules.Schedule,
    loss_spec: losses.LossSpec,
    ema_rates: tuple[float, ...],
    grad_accum_steps: int = 1,
    importance_weighting: bool = False,
    class_conditional: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch. Pure: the same inputs give the same outputs.

    Args:
      state: the train state.
      batch: 'image' [B, H, W, C] float32 in [−1, 1] and 'label' [B] int32.
      train_key: the run's training key; the step's key is fold_in(train_key, state.step).
    """
    x0 = batch["image"]  # [B, H, W, C]
    key = jax.random.fold_in(train_key, state.step)
    t_key, noise_key, dropout_key = jax.random.split(key, 3)

    t = _draw_timesteps(sampler, state.sampler_state, t_key, x0.shape[0])  # [B]
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    xt = diffusion.q_sample(schedule, x0, t, noise)
    weight = (
        timesteps.importance_weights(sampler, t, state.sampler_state)
        if importance_weighting
        else jnp.ones(t.shape, jnp.float32)
    )
    y = batch["label"] if class_conditional else None

    def loss_fn(params, xt, t, x0, noise, y, weight, rng):
        out = model.apply({"params": params}, xt, t, y, train=True, rngs={"dropout": rng})
        terms = losses.per_example_loss(loss_spec, schedule, out, x0, xt, t, noise)
        return jnp.mean(terms["loss"] * weight), terms

    grads, terms = _gradients(
        loss_fn, state.params, (xt, t, x0, noise, y, weight), dropout_key, grad_accum_steps
    )
    loss = jnp.mean(terms["loss"] * weight)
    grad_norm = optax.tree.norm(grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = tuple(
        ema_update(ema, params, rate) for rate, ema in zip(ema_rates, state.ema_params, strict=True)
    )
    sampler_state = state.sampler_state
    if state_lib.is_stateful(sampler):
        sampler_state = sampler.update(sampler_state, t, jax.lax.stop_gradient(terms["loss"]))

    new_state = _apply_if_finite(
        state,
        jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        sampler_state=sampler_state,
    )
    metrics = {
        "loss": loss,
        "mse": jnp.mean(terms["mse"]),
        "vb": jnp.mean(terms["vb"]),
        "grad_norm": grad_norm,
        "skipped_steps": new_state.skipped_steps,
        "lr": lr_schedule(state.step),
        "t_mean": jnp.mean(t.astype(jnp.float32)),
        **loss_by_quarter(terms["loss"], t, schedule.num_timesteps),
    }
    return new_state, metrics


def _draw_timesteps(sampler, sampler_state, key: jax.Array, batch_size: int) -> jax.Array:
    """t [B] int32 from the configured law (the loss-aware one reads its state)."""
    if state_lib.is_stateful(sampler):
        return sampler(key, (batch_size,), sampler_state)
    return sampler(key, (batch_size,))


def _gradients(loss_fn, params, inputs, dropout_key, grad_accum_steps: int):
    """(mean gradient, per-example loss terms [B]) over `grad_accum_steps` micro-batches.

    Micro-batch i holds rows i, i+A, i+2A, …, so each device's rows stay on it; the gradients are
    averaged and the per-example terms put back in batch order.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (_, terms), grads = grad_fn(params, *inputs, dropout_key)
        return grads, terms
    batch_size = inputs[0].shape[0]

    def split(a):
        if a is None:
            return None
        a = a.reshape((batch_size // grad_accum_steps, grad_accum_steps) + a.shape[1:])
        return jnp.moveaxis(a, 1, 0)

    def body(acc, micro):
        i, mb = micro
        (_, mb_terms), g = grad_fn(params, *mb, jax.random.fold_in(dropout_key, i))
        return jax.tree.map(jnp.add, acc, g), mb_terms

    zeros = jax.tree.map(jnp.zeros_like, params)
    micro_batches = (jnp.arange(grad_accum_steps), tuple(split(a) for a in inputs))
    grads, terms = jax.lax.scan(body, zeros, micro_batches)
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    terms = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape((batch_size,)), terms)
    return grads, terms


def ema_update(ema: Any, params: Any, rate: float) -> Any:
    """The exponential moving average r·ema + (1 − r)·params, leaf by leaf."""
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def _apply_if_finite(state: TrainState, finite: jax.Array, **updated) -> TrainState:
    """The next state: `updated` when the step was finite, else the old values, counted skipped.

    A non-finite loss or gradient (bad data, an overflow) must not reach the weights: the step
    is skipped on device, with no host sync, and counted; the loop decides what to do.
    """
    kept = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        updated,
        {name: getattr(state, name) for name in updated},
    )
    step = state.step + 1
    first_skipped = jnp.where(
        finite | (state.first_skipped_step >= 0), state.first_skipped_step, step
    )
    return state.replace(
        step=step,
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        first_skipped_step=first_skipped,
        **kept,
    )


def loss_by_quarter(loss: jax.Array, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
    """improved-diffusion's loss_q0..q3: the mean loss [B] of the examples in each quarter of [0, T)."""
    quarter = (t * 4) // num_timesteps
    out = {}
    for q in range(4):
        mask = (quarter == q).astype(jnp.float32)
        out[f"loss_q{q}"] = jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return out


# --- The loop --------------------------------------------------------------------------------


def itstime(step: int, every: int, last: int) -> bool:
    """Whether periodic work is due: every `every` steps and at the last step; never if every=0.

    One predicate for logging, checkpoints, sample grids and evaluation.
    """
    return every > 0 and (step % every == 0 or step == last)


class Trainer:
    """Holds the compiled functions of one run; `train_and_evaluate` drives it."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh | None = None,
        interval: dict | None = None,
    ):
        """`interval`: the located W₂ curve, for timestep laws with 'auto' fields."""
        self.config = config
        self.mesh = mesh or state_lib.build_mesh(config)
        n_shards = sharding.num_batch_shards(self.mesh)
        if config.train.batch_size % (n_shards * config.train.grad_accum_steps):
            raise SetupError(
                f"train.batch_size={config.train.batch_size} must be divisible by the "
                f"{n_shards} devices the batch is split over (mesh.data × mesh.fsdp) × "
                f"train.grad_accum_steps={config.train.grad_accum_steps}."
            )
        parts = state_lib.build(config, interval)
        self.parts = parts
        self.model, self.sampler, self.schedule = parts.model, parts.sampler, parts.schedule
        self.image_shape = parts.image_shape
        keys = state_lib.run_keys(config.seed)
        self.init_key, self.train_key, self.sample_key = keys.init, keys.train, keys.sample

        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        init_fn = parts.init_fn()
        self.abstract_state, self.state_sharding = state_lib.abstract_state(
            init_fn, self.init_key, self.mesh
        )
        self._init = jax.jit(init_fn, out_shardings=self.state_sharding)
        step_fn = functools.partial(
            train_step,
            model=parts.model,
            tx=parts.tx,
            lr_schedule=parts.lr_schedule,
            sampler=parts.sampler,
            schedule=parts.schedule,
            loss_spec=parts.loss_spec,
            ema_rates=tuple(config.train.ema_rates),
            grad_accum_steps=config.train.grad_accum_steps,
            importance_weighting=config.timesteps.importance_weighting,
            class_conditional=config.data.class_conditional,
        )
        batch_sharding = {"image": self.batch_sharding, "label": self.batch_sharding}
        self.step = jax.jit(
            step_fn,
            in_shardings=(self.state_sharding, batch_sharding, self.replicated),
            out_shardings=(self.state_sharding, self.replicated),
            donate_argnums=0,
        )

    def init(self) -> TrainState:
        return self._init(self.init_key)

    def sample(self, params, num: int, key: jax.Array | None = None) -> np.ndarray:
        """`num` samples of `params` as uint8 [num, H, W, C], drawn as --mode=sample draws them.

        The method and its options come from `config.sample`, the step count from
        `train.sample_steps`; batches of `sample.batch_size` are split over the mesh.
        """
        config = self.config
        spec = sampling.SampleSpec.from_config(config.sample).replace(
            steps=min(config.train.sample_steps, config.diffusion.num_timesteps), num_samples=num
        )
        images, _ = sampling.draw_images(
            spec,
            self.model,
            params,
            self.mesh,
            self.schedule,
            self.image_shape,
            self.sample_key if key is None else key,
            target=config.loss.target,
            learn_sigma=config.model.learn_sigma,
            num_classes=config.model.num_classes,
        )
        return images


SetupError = fields.SetupError


@contextlib.contextmanager
def _input_problems():
    """Turns the errors a library raises about the user's files into a one-line SetupError.

    Only around calls that read the user's data, workdir or checkpoints: anything else that
    fails during setup is a bug and keeps its traceback.
    """
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if isinstance(e, SetupError):
            raise
        raise SetupError(str(e)) from e


class TrainingHalted(RuntimeError):
    """Training stopped on a fault (a non-finite loss under train.on_nonfinite='halt')."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest checkpoint when there is one.

    SIGTERM or SIGINT (or, with several processes, the cluster's preemption notice) ends the
    current step, writes a checkpoint synchronously and returns: rerun to resume.

    Raises:
      SetupError: the config, data or workdir cannot be used; raised before training, with
        nothing in the workdir changed.
      TrainingHalted: a non-finite loss or gradient with train.on_nonfinite='halt'; the
        checkpoints written before it are kept, and none is written after it.
    """
    validate.validate_config(config, num_devices=jax.device_count(), mode="train")
    with _input_problems():  # a writer the config asks for but the install lacks
        metric_log.check_writers(config)
    with _input_problems():  # locating t_δ reads the user's data
        located = locate_if_needed(config, workdir)
    trainer = Trainer(config, interval=located)
    if jax.process_index() == 0:
        for warning in timesteps.warnings_for(trainer.sampler):
            logging.warning("%s", warning)
    with _input_problems():  # a dataset not prepared, an empty folder, unreadable files
        loader = data.build(
            data.DataSpec.from_config(config.data),
            seed=config.seed,
            global_batch_size=config.train.batch_size,
            sharding=trainer.batch_sharding,
        )
    check_workdir(workdir, trainer.abstract_state)
    with _input_problems():  # a workdir holding another model's checkpoint
        ckpt = checkpointing.Checkpoints(
            workdir, keep=config.train.keep_checkpoints, keep_period=config.train.keep_period
        )
        if ckpt.latest_step() is not None:
            state, data_state = ckpt.restore(trainer.abstract_state)
            loader.set_state(data_state)
            logging.info("Resuming at step %d.", int(state.step))
        else:
            state = None

    is_main = jax.process_index() == 0
    num_steps = config.train.num_steps
    # clu imports TensorFlow (seconds on a small CPU): only once the run is known to be good.
    writer, report = metric_log.open_writers(
        workdir, is_main=is_main, num_steps=num_steps, wandb_project=config.train.wandb_project
    )
    _save_config(config, workdir)
    if state is None:
        state = trainer.init()
        writer.write_hparams(metric_log.flat_hparams(config))
    start = int(state.step)
    tc = config.train
    pending = None  # (step, metrics) of the previous step, fetched after the next is dispatched.
    skipped_seen = 0  # non-finite steps already reported
    stop = preemption.StopRequest()
    try:
        with loader, stop:
            for step in range(start + 1, num_steps + 1):
                batch = next(loader)
                state, metrics = trainer.step(state, batch, trainer.train_key)
                if pending is not None:
                    skipped_seen = _write_metrics(writer, *pending, loader, skipped_seen)
                    _check_finite(state, tc.on_nonfinite, ckpt, skipped_seen)
                    pending = None
                if itstime(step, tc.log_every, num_steps):
                    pending = (step, metrics)
                report(step, time.time())
                if itstime(step, tc.sample_every, num_steps):
                    _write_samples(trainer, state, step, workdir, writer, is_main)
                if itstime(step, tc.eval_every, num_steps):
                    _evaluate(trainer, state, step, writer, is_main)
                stopping = stop.reached(step)
                if itstime(step, tc.checkpoint_every, num_steps) or stopping:
                    _check_finite(state, tc.on_nonfinite, ckpt)
                    ckpt.save(step, state, loader.get_state())
                if stopping:
                    ckpt.wait()
                    logging.warning(
                        "Stopped by %s after step %d; checkpoint written to %s/%d. Rerun the "
                        "same command to resume.",
                        stop.signal_name,
                        step,
                        ckpt.directory,
                        step,
                    )
                    break
            if pending is not None:
                _write_metrics(writer, *pending, loader, skipped_seen)
                _check_finite(state, tc.on_nonfinite, ckpt)
    finally:
        ckpt.close()  # waits for a save in flight: the newest good checkpoint is complete
        writer.flush()
    return state


def check_workdir(workdir: str, abstract_state: Any) -> None:
    """Checks the disk can hold two checkpoints of this state, then creates the workdir.

    Raises:
      SetupError: naming --workdir and what to do.
    """
    if not artifacts.is_remote(workdir):  # an object store has no "disk" to fill
        existing = os.path.abspath(workdir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract_state))
        needed = 2 * state_bytes + (64 << 20)  # the save in flight, the one kept, and logs
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise SetupError(
                f"--workdir={workdir}: {free / 2**30:.2f} GiB free, but a checkpoint of this "
                f"model takes {state_bytes / 2**30:.2f} GiB and training needs room for two "
                f"({needed / 2**30:.2f} GiB); free some space or use another --workdir."
            )
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        probe = epath.Path(workdir) / f".write_test_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SetupError(
            f"--workdir={workdir} cannot be written ({type(e).__name__}: {e}); choose a "
            "directory this user can create files in."
        ) from e


def _write_metrics(writer, step, metrics, loader, skipped_seen: int) -> int:
    """Writes one step's metrics; warns when steps were skipped since the last write."""
    metrics = jax.device_get(metrics)
    if loader.skipped_examples:
        metrics["data_skipped_examples"] = loader.skipped_examples
    writer.write_scalars(step, metrics)
    skipped = int(metrics["skipped_steps"])
    if skipped > skipped_seen:
        logging.warning(
            "%d step(s) up to step %d had a non-finite loss or gradient; their updates were "
            "not applied (train.on_nonfinite).",
            skipped,
            step,
        )
    return skipped


def _check_finite(state: TrainState, on_nonfinite: str, ckpt, known_skipped: int = -1) -> None:
    """Raises TrainingHalted if a step was non-finite and train.on_nonfinite is 'halt'.

    `known_skipped` ≥ 0 is the count just read from the metrics: the state is not read then
    unless a step was skipped, so a healthy run does not wait on the device here.
    """
    if on_nonfinite != "halt" or known_skipped == 0:
        return
    skipped, first = jax.device_get((state.skipped_steps, state.first_skipped_step))
    if int(skipped):
        raise TrainingHalted(
            f"the loss or gradient was not finite at step {int(first)} and "
            f"train.on_nonfinite='halt': training stopped without applying that update. The "
            f"last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower "
            "optim.lr, enable optim.grad_clip, check the data, or set "
            "train.on_nonfinite='skip' to skip such steps."
        )


def locate_if_needed(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """The located W₂ curve when a timestep field is 'auto' (else None): the workdir's
    interval.json, or a new `interval.run_locate` that writes it there."""
    if not timesteps.needs_interval(config.timesteps):
        return None
    from ddpm_bs import interval

    located = interval.load_result(workdir)
    if located is None:
        logging.info("timesteps: 'auto' fields; locating t_δ with optimal transport first.")
        located = interval.run_locate(config, workdir)
    logging.info(
        "Training with the located t_δ = %d (t_δ/T = %.3f), W₂ decay rate K = %.3g.",
        located["t_delta"],
        located["t_delta"] / config.diffusion.num_timesteps,
        located.get("decay_rate", float("nan")),
    )
    return located


def _write_samples(trainer, state, step, workdir, writer, is_main):
    images = trainer.sample(state.ema_params[0], trainer.config.train.num_samples)
    if not is_main:
        return
    factor = max(1, 32 // images.shape[1])  # small images are enlarged (nearest) to be readable
    grid = sampling.image_grid(images.repeat(factor, axis=1).repeat(factor, axis=2))
    epath.Path(workdir, "samples").mkdir(parents=True, exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    artifacts.save_png(grid, path)
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Wrote %s", path)


def _evaluate(trainer, state, step, writer, is_main):
    """Scores train.eval_samples samples of the first EMA (drawn as the grids are) with sample.metric."""
    from ddpm_bs import evaluation

    config = trainer.config
    key = jax.random.fold_in(trainer.sample_key, 1)  # not the grids' draws
    images = trainer.sample(state.ema_params[0], config.train.eval_samples, key)
    if not is_main:
        return
    result = evaluation.evaluate_images(
        images,
        metrics=config.sample.metric,
        inception_weights=config.sample.inception_weights,
        reference=config.sample.reference_stats,
    )
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    logging.info("Evaluation at step %d: %s", step, result)


def _save_config(config, workdir):
    """Writes config.json on the first start; a resumed run keeps the original."""
    path = os.path.join(workdir, "config.json")
    if jax.process_index() == 0 and not epath.Path(path).exists():
        artifacts.write_bytes(config.to_json_best_effort(indent=2).encode(), path)
