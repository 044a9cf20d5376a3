"""What a run is made of: the config's sections built into library objects, and the TrainState.

Training, sampling, evaluation and the analysis modes all build their model, schedule and
timestep sampler here, so nothing imports the training loop to get them:

    parts = state.build(config)                    # model, schedule, sampler, loss, optimizer
    init_fn = parts.init_fn()                      # key -> TrainState, pure
    abstract, shardings = state.abstract_state(init_fn, key, mesh)   # nothing allocated

`TrainState` holds everything that shapes the next step; the data position is saved beside it
in the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from ddpm_bs import fields, losses, optim, schedules, sharding, timesteps
from ddpm_bs.models import spec as model_spec
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


ON_NONFINITE = ("skip", "halt")  # train.on_nonfinite


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The `train` config section: the loop's sizes and schedules (configs/default.py)."""

    batch_size: int = 128
    grad_accum_steps: int = 1
    num_steps: int = 500_000
    ema_rates: tuple[float, ...] = (0.9999,)
    log_every: int = 100
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 3
    keep_period: int = 0
    sample_every: int = 10_000
    num_samples: int = 64
    sample_steps: int = 100
    eval_every: int = 0
    eval_samples: int = 1797
    on_nonfinite: str = "skip"
    wandb_project: str | None = None

    RULES: ClassVar[dict[str, fields.Check]] = {
        "batch_size": fields.integer(1),
        "grad_accum_steps": fields.integer(1),
        "num_steps": fields.integer(1),
        "ema_rates": fields.tuple_of(
            fields.real(0, 1, low_open=True, high_open=True), "rates in (0, 1)", non_empty=True
        ),
        "log_every": fields.integer(0),
        "checkpoint_every": fields.integer(0),
        "keep_checkpoints": fields.integer(1),
        "keep_period": fields.integer(0),
        "sample_every": fields.integer(0),
        "num_samples": fields.integer(1),
        "sample_steps": fields.integer(1),
        "eval_every": fields.integer(0),
        "eval_samples": fields.integer(2),
        "on_nonfinite": fields.one_of(*ON_NONFINITE),
        "wandb_project": fields.optional(fields.string),
    }
    # Fields older configs may lack; the defaults above stand in.
    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "keep_period",
        "eval_every",
        "eval_samples",
        "on_nonfinite",
        "wandb_project",
    )

    @classmethod
    def from_config(cls, cfg) -> TrainSpec:
        spec = cls(**fields.read(cfg, "train", cls.RULES, optional=cls.OPTIONAL))
        if spec.batch_size % spec.grad_accum_steps:
            fields.fail(
                "train.grad_accum_steps",
                spec.grad_accum_steps,
                f"must divide train.batch_size={spec.batch_size} (each step splits the batch "
                "into that many micro-batches)",
                "use a divisor of the batch size",
            )
        return spec


# --- Builders: a config section → the library object that reads it ----------------------------


def build_model(config: ml_collections.ConfigDict) -> unet.UNet:
    """The U-Net of `config.model`, sized by `config.data` (image size and channels)."""
    return model_spec.ModelSpec.from_config(config.model).build(
        image_size=config.data.image_size, in_channels=config.data.channels, config=config
    )


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    return schedules.from_config(config.diffusion)


def build_sampler(config: ml_collections.ConfigDict, interval: dict | None = None):
    """The timestep sampler of `config.timesteps`.

    `interval` is the located W₂ curve (interval.json's dict) that 'auto' fields read; see
    `timesteps.needs_interval`.
    """
    return timesteps.from_config(
        config.timesteps, schedule=build_schedule(config), interval=interval
    )


def build_loss(config: ml_collections.ConfigDict) -> losses.LossSpec:
    return losses.LossSpec.from_config(config.loss, learn_sigma=config.model.learn_sigma)


def build_mesh(config: ml_collections.ConfigDict) -> Mesh:
    return sharding.make_mesh(config.mesh.data, config.mesh.get("fsdp", 1))


@dataclasses.dataclass(frozen=True)
class Parts:
    """The library objects one run is built from (see `build`)."""

    model: unet.UNet
    schedule: schedules.Schedule
    sampler: Any  # a ddpm_bs.timesteps sampler
    loss_spec: losses.LossSpec
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    image_shape: tuple[int, int, int]  # [H, W, C]
    num_classes: int  # 0: unconditional
    num_ema: int

    def init_fn(self) -> Callable[[jax.Array], TrainState]:
        return functools.partial(
            init_state,
            model=self.model,
            tx=self.tx,
            sampler=self.sampler,
            image_shape=self.image_shape,
            num_classes=self.num_classes,
            num_ema=self.num_ema,
        )


def build(config: ml_collections.ConfigDict, interval: dict | None = None) -> Parts:
    """Every section a run needs, built (and so checked) by the object that reads it.

    `interval`: the located W₂ curve, for timestep laws with 'auto' fields.
    """
    tx, lr_schedule = optim.build(optim.OptimSpec.from_config(config.optim))
    return Parts(
        model=build_model(config),
        schedule=build_schedule(config),
        sampler=build_sampler(config, interval),
        loss_spec=build_loss(config),
        tx=tx,
        lr_schedule=lr_schedule,
        image_shape=(config.data.image_size,) * 2 + (config.data.channels,),
        num_classes=config.model.num_classes,
        num_ema=len(config.train.ema_rates),
    )


# --- Keys and the state ------------------------------------------------------------------------


class Keys(flax.struct.PyTreeNode):
    """The run's named keys, all split once from `config.seed`."""

    init: jax.Array  # parameter init (an RBG key: init compiles ~2× faster than with threefry)
    train: jax.Array  # per step: fold_in(train, step)
    sample: jax.Array  # sample grids, evaluation and mode=sample


def run_keys(seed: int) -> Keys:
    init_key, train_key, sample_key = jax.random.split(jax.random.key(seed), 3)
    # Parameter init runs once, replicated: an RBG key compiles it ~2× faster than threefry on
    # CPU. Still derived from the root seed, so runs stay reproducible.
    init_key = jax.random.wrap_key_data(jax.random.bits(init_key, (4,), jnp.uint32), impl="rbg")
    return Keys(init=init_key, train=train_key, sample=sample_key)


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
        sampler_state=sampler.init_state() if is_stateful(sampler) else None,
        skipped_steps=jnp.zeros((), jnp.int32),
        first_skipped_step=jnp.full((), -1, jnp.int32),
    )


def is_stateful(sampler) -> bool:
    """Whether the timestep sampler keeps state in the TrainState (loss_aware)."""
    return getattr(sampler, "stateful", False)


def abstract_state(init_fn, key: jax.Array, mesh: Mesh) -> tuple[TrainState, Any]:
    """The state's shapes, dtypes and shardings on `mesh`, with nothing allocated.

    Returns (abstract state whose leaves carry their sharding, the sharding pytree); restore a
    checkpoint into the first, or `jax.jit(init_fn, out_shardings=<the second>)(key)`.
    """
    shapes = jax.eval_shape(init_fn, key)
    shardings = sharding.state_shardings(shapes, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return abstract, shardings


def abstract_state_of(
    config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None
) -> TrainState:
    """The abstract TrainState of the run in `workdir`, to restore its checkpoint outside training.

    A timestep law with 'auto' fields is rebuilt from the interval.json training located.
    """
    interval = None
    if timesteps.needs_interval(config.timesteps):
        from ddpm_bs import interval as interval_lib  # ott-jax: only for located laws

        interval = interval_lib.load_result(workdir)
        if interval is None:
            raise fields.SetupError(
                f"--workdir={workdir} has no interval.json, which timesteps.sampler="
                f"{config.timesteps.sampler!r} with 'auto' fields needs: point --workdir at the "
                "run that trained it, or set the located values explicitly."
            )
    mesh = mesh or build_mesh(config)
    return abstract_state(build(config, interval).init_fn(), run_keys(config.seed).init, mesh)[0]
