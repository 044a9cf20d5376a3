"""The training loop: a pure, sharded train step and the loop around it.

`train_and_evaluate(config, workdir)` is the main job. The step reads top to bottom: per-step
key from (seed, step); timesteps, noise and dropout keys split from it; timesteps drawn by the
configured sampler; x_t by `q_sample`; per-example loss; optional importance weights; gradients
(summed over micro-batches); optax update; EMA; sampler-state update; metrics.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import time
from typing import Any

import flax.struct
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
    losses,
    metric_log,
    preemption,
    sampling,
    schedules,
    sharding,
    timesteps,
    validate,
)
from ddpm_bs.models import unet


@flax.struct.dataclass
class TrainState:
    """Everything that shapes the next step (the data position is saved beside it)."""

    step: jax.Array  # [] int32: steps taken.
    params: Any
    ema_params: tuple[Any, ...]  # One params tree per rate in config.train.ema_rates.
    opt_state: Any
    sampler_state: Any  # The loss-aware sampler's history; None for stateless samplers.
    # Steps whose loss or gradient was not finite: their update was not applied.
    skipped_steps: jax.Array  # [] int32
    first_skipped_step: jax.Array  # [] int32: the first such step (1-based), −1 if none.


# --- Builders: config → library objects ----------------------------------------------------


def build_model(config: ml_collections.ConfigDict) -> unet.UNet:
    m = config.model
    model = unet.UNet(
        image_size=config.data.image_size,
        in_channels=config.data.channels,
        model_channels=m.model_channels,
        learn_sigma=m.learn_sigma,
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        dropout=m.dropout,
        channel_mult=tuple(m.channel_mult),
        num_classes=m.num_classes or None,
        num_heads=m.num_heads,
        num_head_channels=m.num_head_channels,
        use_scale_shift_norm=m.use_scale_shift_norm,
        resblock_updown=m.resblock_updown,
        dtype=unet.DTYPES[m.dtype],
        attention_implementation=m.attention_implementation,
    )
    unet.check_config(model)
    return model


def build_sampler(config: ml_collections.ConfigDict):
    ts, num_timesteps = config.timesteps, config.diffusion.num_timesteps
    if ts.sampler not in timesteps.CONFIG_FIELDS:
        raise ValueError(
            f"timesteps.sampler={ts.sampler!r} is unknown; valid samplers: "
            f"{', '.join(timesteps.CONFIG_FIELDS)}."
        )
    if ts.sampler == "bernoulli" and not isinstance(ts.t_delta, int):
        raise ValueError(
            f"timesteps.t_delta={ts.t_delta!r} must be an integer in [1, {num_timesteps}] "
            "(train_and_evaluate resolves 'auto' with the optimal-transport locator first)."
        )
    kwargs = {
        argument: tuple(ts[field]) if isinstance(ts[field], (list, tuple)) else ts[field]
        for argument, field in timesteps.CONFIG_FIELDS[ts.sampler].items()
    }
    if ts.sampler == "lognormal":
        kwargs["schedule"] = config.diffusion.schedule
    return timesteps.get_sampler(ts.sampler, num_timesteps, **kwargs)


def build_loss(config: ml_collections.ConfigDict) -> losses.LossSpec:
    lc = config.loss
    return losses.LossSpec(
        target=lc.target,
        weighting=lc.weighting,
        p2_k=lc.p2_k,
        p2_gamma=lc.p2_gamma,
        min_snr_gamma=lc.min_snr_gamma,
        max_weight=lc.max_weight,
        learn_sigma=config.model.learn_sigma,
    )


def build_optimizer(config: ml_collections.ConfigDict):
    """AdamW with linear warm-up then a constant rate (ADM), and global-norm clipping."""
    o = config.optim
    if o.warmup_steps > 0:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
            [o.warmup_steps],
        )
    else:
        lr = optax.constant_schedule(o.lr)
    adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
    return tx, lr


def build_mesh(config: ml_collections.ConfigDict) -> Mesh:
    return sharding.make_mesh(config.mesh.data, config.mesh.get("fsdp", 1))


# --- The step --------------------------------------------------------------------------------


def init_state(key, *, model, tx, sampler, image_shape, num_classes, num_ema) -> TrainState:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if num_classes else None
    params = model.init({"params": key}, x, t, y, train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(params for _ in range(num_ema)),
        opt_state=tx.init(params),
        sampler_state=sampler.init_state() if _is_stateful(sampler) else None,
        skipped_steps=jnp.zeros((), jnp.int32),
        first_skipped_step=jnp.full((), -1, jnp.int32),
    )


def _is_stateful(sampler) -> bool:
    return getattr(sampler, "stateful", False)


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
    x0 = batch["image"]
    bsz = x0.shape[0]
    key = jax.random.fold_in(train_key, state.step)
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    if _is_stateful(sampler):
        t = sampler(t_key, (bsz,), state.sampler_state)
    else:
        t = sampler(t_key, (bsz,))
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    xt = diffusion.q_sample(schedule, x0, t, noise)
    if importance_weighting:
        example_weight = timesteps.importance_weights(sampler, t, state.sampler_state)
    else:
        example_weight = jnp.ones((bsz,), jnp.float32)
    y = batch["label"] if class_conditional else None

    def loss_fn(params, xt, t, x0, noise, y, weight, rng):
        out = model.apply({"params": params}, xt, t, y, train=True, rngs={"dropout": rng})
        terms = losses.per_example_loss(loss_spec, schedule, out, x0, xt, t, noise)
        return jnp.mean(terms["loss"] * weight), terms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro = (xt, t, x0, noise, y, example_weight)
    if grad_accum_steps == 1:
        (_, terms), grads = grad_fn(state.params, *micro, dropout_key)
    else:
        # Micro-batch i holds rows i, i+A, i+2A, …: each device's rows stay on it.
        def split(a):
            if a is None:
                return None
            a = a.reshape((bsz // grad_accum_steps, grad_accum_steps) + a.shape[1:])
            return jnp.moveaxis(a, 1, 0)

        def body(acc, inputs):
            i, mb = inputs
            (_, mb_terms), g = grad_fn(state.params, *mb, jax.random.fold_in(dropout_key, i))
            return jax.tree.map(jnp.add, acc, g), mb_terms

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_split = tuple(split(a) for a in micro)
        grads, terms = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro_split))
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
        # Undo the split so per-example terms line up with t again.
        terms = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape((bsz,)), terms)

    loss = jnp.mean(terms["loss"] * example_weight)
    grad_norm = _global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = tuple(
        jax.tree.map(lambda e, p, r=rate: r * e + (1.0 - r) * p, ema, params)
        for rate, ema in zip(ema_rates, state.ema_params, strict=True)
    )
    sampler_state = state.sampler_state
    if _is_stateful(sampler):
        sampler_state = sampler.update(sampler_state, t, jax.lax.stop_gradient(terms["loss"]))
    # A non-finite loss or gradient (bad data, an overflow) must not reach the weights: the
    # step is skipped on device, with no host sync, and counted; the loop decides what to do.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, ema_params, opt_state, sampler_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, ema_params, opt_state, sampler_state),
        (state.params, state.ema_params, state.opt_state, state.sampler_state),
    )
    step = state.step + 1
    first_skipped = jnp.where(
        finite | (state.first_skipped_step >= 0), state.first_skipped_step, step
    )
    new_state = TrainState(
        step=step,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        sampler_state=sampler_state,
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        first_skipped_step=first_skipped,
    )
    metrics = {
        "loss": loss,
        "mse": jnp.mean(terms["mse"]),
        "vb": jnp.mean(terms["vb"]),
        "grad_norm": grad_norm,
        "skipped_steps": new_state.skipped_steps,
        "lr": lr_schedule(state.step),
        "t_mean": jnp.mean(t.astype(jnp.float32)),
    }
    # improved-diffusion's loss_q0..q3: mean loss over the examples in each quarter of [0, T).
    quarter = (t * 4) // schedule.num_timesteps
    for q in range(4):
        mask = (quarter == q).astype(jnp.float32)
        metrics[f"loss_q{q}"] = jnp.sum(terms["loss"] * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return new_state, metrics


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# --- The loop --------------------------------------------------------------------------------


def itstime(step: int, every: int, last: int) -> bool:
    """Periodic work happens every `every` steps (0 = never) and at the last step."""
    return step == last or (every > 0 and step % every == 0)


class Trainer:
    """Holds the compiled functions of one run; `train_and_evaluate` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh or build_mesh(config)
        n_shards = sharding.num_batch_shards(self.mesh)
        if config.train.batch_size % (n_shards * config.train.grad_accum_steps):
            raise ValueError(
                f"train.batch_size={config.train.batch_size} must be divisible by the "
                f"{n_shards} devices the batch is split over (mesh.data × mesh.fsdp) × "
                f"train.grad_accum_steps={config.train.grad_accum_steps}."
            )
        self.model = build_model(config)
        self.sampler = build_sampler(config)
        self.schedule = schedules.get_schedule(
            config.diffusion.schedule, config.diffusion.num_timesteps
        )
        self.loss_spec = build_loss(config)
        self.tx, self.lr_schedule = build_optimizer(config)
        self.image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
        root = jax.random.key(config.seed)
        init_key, self.train_key, self.sample_key = jax.random.split(root, 3)
        # Parameter init runs once, replicated: an RBG key compiles it ~2× faster than threefry
        # on CPU. Still derived from the root seed, so runs stay reproducible.
        self.init_key = jax.random.wrap_key_data(
            jax.random.bits(init_key, (4,), jnp.uint32), impl="rbg"
        )

        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        init_fn = functools.partial(
            init_state,
            model=self.model,
            tx=self.tx,
            sampler=self.sampler,
            image_shape=self.image_shape,
            num_classes=config.model.num_classes,
            num_ema=len(config.train.ema_rates),
        )
        self.abstract_state = jax.eval_shape(init_fn, self.init_key)
        self.state_sharding = sharding.state_shardings(self.abstract_state, self.mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_sharding,
        )
        self._init = jax.jit(init_fn, out_shardings=self.state_sharding)
        step_fn = functools.partial(
            train_step,
            model=self.model,
            tx=self.tx,
            lr_schedule=self.lr_schedule,
            sampler=self.sampler,
            schedule=self.schedule,
            loss_spec=self.loss_spec,
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
        """DDIM samples from `params` as uint8 [num, H, W, C]."""
        config = self.config
        key = self.sample_key if key is None else key
        y = (
            jnp.arange(num, dtype=jnp.int32) % config.model.num_classes
            if config.model.num_classes
            else None
        )
        fn = _sample_fn(self.model, config, num, self.image_shape)
        return sampling.to_uint8(fn(params, key, y))


@functools.lru_cache(maxsize=8)
def _cached_sample_fn(model, key_fields, num, image_shape):
    schedule_name, num_timesteps, steps, target, learn_sigma = key_fields

    @jax.jit
    def fn(params, key, y):
        def model_fn(x, t):
            return model.apply({"params": params}, x, t, y, train=False)

        return sampling.ddim_sample(
            model_fn,
            schedule_name,
            num_timesteps,
            (num, *image_shape),
            key,
            steps=steps,
            target=target,
            learn_sigma=learn_sigma,
        )

    return fn


def _sample_fn(model, config, num, image_shape):
    fields = (
        config.diffusion.schedule,
        config.diffusion.num_timesteps,
        min(config.train.sample_steps, config.diffusion.num_timesteps),
        config.loss.target,
        config.model.learn_sigma,
    )
    return _cached_sample_fn(model, fields, num, image_shape)


class SetupError(ValueError):
    """A problem with the config, the data or the workdir, found before any training step."""


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
    jax.config.update("jax_threefry_partitionable", True)
    try:
        validate.validate_config(config, num_devices=jax.device_count(), mode="train")
        config = resolve_t_delta(config, workdir)
        trainer = Trainer(config)
        loader = data.build(
            data.DataSpec.from_config(config.data),
            seed=config.seed,
            global_batch_size=config.train.batch_size,
            sharding=trainer.batch_sharding,
        )
        check_workdir(workdir, trainer.abstract_state)
        ckpt = checkpointing.Checkpoints(workdir, keep=config.train.keep_checkpoints)
        if ckpt.latest_step() is not None:
            state, data_state = ckpt.restore(trainer.abstract_state)
            loader.set_state(data_state)
            logging.info("Resuming at step %d.", int(state.step))
        else:
            state = None
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise SetupError(str(e)) from e

    is_main = jax.process_index() == 0
    num_steps = config.train.num_steps
    # clu imports TensorFlow (seconds on a small CPU): only once the run is known to be good.
    writer, report = metric_log.open_writers(workdir, is_main=is_main, num_steps=num_steps)
    _save_config(config, workdir)
    if state is None:
        state = trainer.init()
        writer.write_hparams(_flat_hparams(config))
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
                if tc.sample_every > 0 and itstime(step, tc.sample_every, num_steps):
                    _write_samples(trainer, state, step, workdir, writer, is_main)
                if tc.eval_every > 0 and itstime(step, tc.eval_every, num_steps):
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
      PermissionError, ValueError: naming --workdir and what to do.
    """
    if not artifacts.is_remote(workdir):  # an object store has no "disk" to fill
        existing = os.path.abspath(workdir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract_state))
        needed = 2 * state_bytes + (64 << 20)  # the save in flight, the one kept, and logs
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise ValueError(
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
        raise PermissionError(
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


def resolve_t_delta(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Replaces timesteps.t_delta='auto' by the located t_δ (the workdir's interval.json, or a new
    `interval.run_locate`), logging it. Other configs are returned unchanged."""
    if config.timesteps.t_delta != "auto":
        return config
    from ddpm_bs import interval

    t_delta = interval.load_t_delta(workdir)
    if t_delta is None:
        logging.info("timesteps.t_delta='auto': locating t_δ with optimal transport first.")
        t_delta = interval.run_locate(config, workdir)["t_delta"]
    config = copy.deepcopy(config)
    config.timesteps.t_delta = int(t_delta)
    logging.info(
        "Training with the located t_δ = %d (t_δ/T = %.3f).",
        t_delta,
        t_delta / config.diffusion.num_timesteps,
    )
    return config


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
    """Scores train.eval_samples DDIM samples of the first EMA with sample.metric."""
    from ddpm_bs import evaluation

    config = trainer.config
    n, chunk = config.train.eval_samples, config.train.num_samples  # the grid's compiled size
    keys = [jax.random.fold_in(trainer.sample_key, 1 + i) for i in range(-(-n // chunk))]
    images = np.concatenate([trainer.sample(state.ema_params[0], chunk, k) for k in keys])[:n]
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


def _flat_hparams(config) -> dict[str, Any]:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, ml_collections.ConfigDict):
                walk(name + ".", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[name] = v
            else:
                flat[name] = json.dumps(v) if v is not None else "None"

    walk("", config)
    return flat
