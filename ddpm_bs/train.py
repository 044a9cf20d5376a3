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
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_bs import (
    artifacts,
    checkpointing,
    data,
    diffusion,
    losses,
    sampling,
    schedules,
    timesteps,
)
from ddpm_bs.models import unet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything that shapes the next step (the data position is saved beside it)."""

    step: jax.Array  # [] int32: steps taken.
    params: Any
    ema_params: tuple[Any, ...]  # One params tree per rate in config.train.ema_rates.
    opt_state: Any
    sampler_state: Any  # The loss-aware sampler's history; None for stateless samplers.


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
        dtype=DTYPES[m.dtype],
        attention_implementation=m.attention_implementation,
    )
    unet.check_config(model)
    return model


def build_sampler(config: ml_collections.ConfigDict):
    ts, num_timesteps = config.timesteps, config.diffusion.num_timesteps
    kwargs = {
        "uniform": {},
        "bernoulli": dict(t_delta=ts.t_delta, p=ts.p),
        "piecewise": dict(boundaries=tuple(ts.boundaries), masses=tuple(ts.masses)),
        "beta": dict(a=ts.beta_a, b=ts.beta_b),
        "lognormal": dict(p_mean=ts.p_mean, p_std=ts.p_std, schedule=config.diffusion.schedule),
        "logit_normal": dict(mean=ts.logit_mean, std=ts.logit_std),
        "loss_aware": dict(history_per_term=ts.history, uniform_prob=ts.uniform_prob),
    }
    if ts.sampler == "bernoulli" and not isinstance(ts.t_delta, int):
        raise ValueError(
            f"timesteps.t_delta={ts.t_delta!r} must be an integer in [1, {num_timesteps}] "
            "(train_and_evaluate resolves 'auto' with the optimal-transport locator first)."
        )
    if ts.sampler not in kwargs:
        raise ValueError(
            f"timesteps.sampler={ts.sampler!r} is unknown; valid samplers: {', '.join(kwargs)}."
        )
    return timesteps.get_sampler(ts.sampler, num_timesteps, **kwargs[ts.sampler])


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
    devices = jax.devices()
    n = len(devices) if config.mesh.data == -1 else config.mesh.data
    if n < 1 or n > len(devices):
        raise ValueError(
            f"mesh.data={config.mesh.data} must be −1 (all) or in [1, {len(devices)}] devices."
        )
    return Mesh(np.asarray(devices[:n]), ("data",))


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

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = tuple(
        jax.tree.map(lambda e, p, r=rate: r * e + (1.0 - r) * p, ema, params)
        for rate, ema in zip(ema_rates, state.ema_params, strict=True)
    )
    sampler_state = state.sampler_state
    if _is_stateful(sampler):
        sampler_state = sampler.update(sampler_state, t, jax.lax.stop_gradient(terms["loss"]))
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        sampler_state=sampler_state,
    )
    metrics = {
        "loss": jnp.mean(terms["loss"] * example_weight),
        "mse": jnp.mean(terms["mse"]),
        "vb": jnp.mean(terms["vb"]),
        "grad_norm": _global_norm(grads),
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
        n_data = self.mesh.shape["data"]
        if config.train.batch_size % (n_data * config.train.grad_accum_steps):
            raise ValueError(
                f"train.batch_size={config.train.batch_size} must be divisible by the "
                f"{n_data} devices on the mesh's data axis × train.grad_accum_steps="
                f"{config.train.grad_accum_steps}."
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
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
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
        self.state_sharding = jax.tree.map(lambda _: self.replicated, self.abstract_state)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest checkpoint when there is one.

    Raises:
      SetupError: the config, data or workdir cannot be used; raised before training, with
        nothing in the workdir changed.
    """
    jax.config.update("jax_threefry_partitionable", True)
    try:
        config = resolve_t_delta(config, workdir)
        trainer = Trainer(config)
        loader = data.build(
            data.DataSpec.from_config(config.data),
            seed=config.seed,
            global_batch_size=config.train.batch_size,
            sharding=trainer.batch_sharding,
        )
        os.makedirs(workdir, exist_ok=True)
        ckpt = checkpointing.Checkpoints(workdir, keep=config.train.keep_checkpoints)
        if ckpt.latest_step() is not None:
            state, data_state = ckpt.restore(trainer.abstract_state)
            loader.set_state(data_state)
            logging.info("Resuming at step %d.", int(state.step))
        else:
            state = None
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise SetupError(str(e)) from e

    # clu imports TensorFlow (seconds on a small CPU): only once the run is known to be good.
    from clu import metric_writers, periodic_actions

    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    _save_config(config, workdir)
    if state is None:
        state = trainer.init()
        writer.write_hparams(_flat_hparams(config))
    start = int(state.step)
    num_steps = config.train.num_steps
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    tc = config.train
    pending = None  # (step, metrics) of the previous step, fetched after the next is dispatched.
    with loader:
        for step in range(start + 1, num_steps + 1):
            batch = next(loader)
            state, metrics = trainer.step(state, batch, trainer.train_key)
            if pending is not None:
                writer.write_scalars(pending[0], jax.device_get(pending[1]))
                pending = None
            if itstime(step, tc.log_every, num_steps):
                pending = (step, metrics)
            report(step, time.time())
            if tc.sample_every > 0 and itstime(step, tc.sample_every, num_steps):
                _write_samples(trainer, state, step, workdir, writer, is_main)
            if itstime(step, tc.checkpoint_every, num_steps):
                ckpt.save(step, state, {"step": loader.step})
        if pending is not None:
            writer.write_scalars(pending[0], jax.device_get(pending[1]))
    ckpt.close()
    writer.flush()
    return state


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
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
    artifacts.save_png(grid, path)
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Wrote %s", path)


def _save_config(config, workdir):
    """Writes config.json on the first start; a resumed run keeps the original."""
    path = os.path.join(workdir, "config.json")
    if jax.process_index() == 0 and not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)


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
