"""One up-front check of a whole config for a mode: the first problem, on one line, before any compile.

    validate.validate_config(config, num_devices=jax.device_count(), mode="train")

Each section is read by the object built from it, which checks its own fields and names them
(`fields.read`): `data` by `data.DataSpec`, `model` by `models.spec.ModelSpec`, `diffusion` by
`schedules.from_config`, `timesteps` by `timesteps.from_config`, `loss` by `losses.LossSpec`,
`optim` by `optim.OptimSpec`, `train` by `state.TrainSpec`, `interval` by
`interval.IntervalSpec`, `sample` by `sampling.SampleSpec` (its metric fields by
`evaluation.MetricSpec`) and `mesh` by `sharding.MeshSpec`. Unknown fields fail in every section, so a typo in a config file
fails as one on the command line does. What stays here spans sections: the batch over the mesh,
the classes over the data, the steps over T, the metrics over their files.

A mode checks only the sections it reads: `sample` ignores `optim`, `train` ignores `sample.eta`.
Nothing is traced, compiled, loaded or initialised, so it takes milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ddpm_bs import data, evaluation, fields, losses, optim, sampling, schedules, sharding, state
from ddpm_bs import timesteps as timesteps_lib
from ddpm_bs.fields import ConfigError, fail, lookup
from ddpm_bs.models import spec as model_spec

__all__ = ["ConfigError", "MODES", "SECTION_FIELDS", "validate_config"]

MODES = ("train", "sample", "eval", "locate", "geometry")
SEED_MAX = 2**32 - 1  # jax.random.key keeps 32 bits without x64: 2**32 would collide with 0

# The image a model is built for (sampling and geometry need it without the data source).
IMAGE_RULES: dict[str, fields.Check] = {
    "image_size": fields.integer(1),
    "channels": fields.one_of(1, 3),
}


def _interval_fields() -> tuple[str, ...]:
    from ddpm_bs import interval  # ott-jax: imported only when a mode reads the section

    return tuple(f.name for f in dataclasses.fields(interval.IntervalSpec))


# Every field each section may hold, from the specs that read it: configs/default.py must hold
# exactly these (tests/test_validate.py checks both directions).
SECTION_FIELDS: dict[str, Callable[[], tuple[str, ...]]] = {
    "data": lambda: tuple(f.name for f in dataclasses.fields(data.DataSpec)),
    "model": lambda: tuple(model_spec.ModelSpec.RULES),
    "diffusion": lambda: tuple(schedules.DIFFUSION_RULES),
    "timesteps": lambda: timesteps_lib.FIELDS,
    "loss": lambda: tuple(losses.LossSpec.RULES),
    "optim": lambda: tuple(optim.OptimSpec.RULES),
    "train": lambda: tuple(state.TrainSpec.RULES),
    "interval": _interval_fields,
    "sample": lambda: (*sampling.SampleSpec.RULES, *evaluation.MetricSpec.RULES),
    "mesh": lambda: tuple(sharding.MeshSpec.RULES),
}


def validate_config(config: Any, *, num_devices: int | None = None, mode: str = "train") -> None:
    """Raises `ConfigError` on the first problem with `config` for `mode`; returns None if none.

    Args:
      config: an ml_collections ConfigDict (or nested mappings) shaped like configs/default.py.
      num_devices: devices the run will use (`jax.device_count()`); None skips the checks
        that need it (mesh sizes, the split of train.batch_size over the mesh).
      mode: 'train', 'sample', 'eval', 'locate' or 'geometry'.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; valid modes: {', '.join(MODES)}.")
    if num_devices is not None and (not fields.is_int(num_devices) or num_devices < 1):
        raise ValueError(f"num_devices must be None or an integer ≥ 1, got {num_devices!r}.")
    fields.check_known(config, {"seed": None, **SECTION_FIELDS})
    problem = fields.integer(0, SEED_MAX)(lookup(config, "seed"))
    if problem:
        fail("seed", lookup(config, "seed"), problem)

    reads_model = mode in ("train", "sample", "geometry")
    if mode in ("train", "locate", "geometry"):
        _wrap_spec_error(lambda: data.DataSpec.from_config(config.data), "data")
    elif reads_model:
        fields.read(config.get("data"), "data", IMAGE_RULES, others=SECTION_FIELDS["data"]())
    if reads_model:
        model = model_spec.ModelSpec.from_config(config.get("model"))
        model.build(
            image_size=config.data.image_size, in_channels=config.data.channels, config=config
        )
    if mode != "eval":
        schedules.from_config(config.get("diffusion"))
    if mode in ("train", "sample", "geometry"):
        losses.LossSpec.from_config(config.get("loss"), learn_sigma=config.model.learn_sigma)
    if mode == "train":
        _check_training(config, num_devices)
    if mode == "sample":
        _check_sampling(config, config.get("sample"))
        _check_mesh(config, num_devices)
    if mode == "eval":
        _check_metric(config)
    if mode == "locate" or (mode == "train" and timesteps_lib.needs_interval(config.timesteps)):
        _check_interval(config)


def _check_training(config: Any, num_devices: int | None) -> None:
    schedule = schedules.from_config(config.diffusion)
    # 'auto' fields stand for what the locator will find, so the rest is checked before it runs.
    timesteps_lib.check(config.get("timesteps"), schedule=schedule)
    optim.OptimSpec.from_config(config.get("optim"))
    train = state.TrainSpec.from_config(config.get("train"))
    num_timesteps = config.diffusion.num_timesteps
    if train.sample_steps > num_timesteps:
        fail(
            "train.sample_steps",
            train.sample_steps,
            f"must be an integer in [1, diffusion.num_timesteps={num_timesteps}] (steps of the "
            "sample grids and evaluations)",
        )
    conditional, num_classes = config.data.class_conditional, config.model.num_classes
    if conditional and not num_classes:
        fail(
            "data.class_conditional",
            True,
            "needs model.num_classes > 0 (the model embeds the labels), but it is 0",
            "set --config.model.num_classes to the number of classes, or "
            "data.class_conditional=False",
        )
    if num_classes and not conditional:
        fail(
            "model.num_classes",
            num_classes,
            "makes the model class-conditional, but data.class_conditional=False feeds no labels",
            "set --config.data.class_conditional=True, or model.num_classes=0",
        )
    if train.eval_every > 0:
        _check_metric(config)
    _check_mesh(config, num_devices, batch_size=train.batch_size, accum=train.grad_accum_steps)


def _check_sampling(config: Any, cfg: Any) -> None:
    spec = sampling.SampleSpec.from_config(cfg)
    num_timesteps = config.diffusion.num_timesteps
    low = 2 if spec.method in ("dpm_solver", "dpm_solver++") else 1
    if not low <= spec.steps <= num_timesteps:
        fail(
            "sample.steps",
            spec.steps,
            f"must be an integer in [{low}, diffusion.num_timesteps={num_timesteps}] for "
            f"sample.method={spec.method!r}",
        )


def _check_metric(config: Any) -> None:
    evaluation.MetricSpec.from_config(config.get("sample"), others=tuple(sampling.SampleSpec.RULES))


def _check_interval(config: Any) -> None:
    from ddpm_bs import interval

    _wrap_spec_error(lambda: interval.IntervalSpec.from_config(config.get("interval")), "interval")


def _check_mesh(config: Any, num_devices: int | None, batch_size=None, accum=1) -> None:
    """The mesh over the devices, and the global batch over its data × fsdp shards × micro-batches."""
    mesh = sharding.MeshSpec.from_config(config.get("mesh"))
    if num_devices is None:
        return
    data_axis, fsdp = mesh.shape(num_devices)
    step = data_axis * fsdp * accum
    if batch_size is not None and batch_size % step:
        below = batch_size // step * step
        examples = " or ".join(str(v) for v in (below, below + step) if v > 0)
        fail(
            "train.batch_size",
            batch_size,
            f"must be divisible by the {data_axis * fsdp} devices the batch is split over "
            f"(mesh.data × mesh.fsdp = {data_axis} × {fsdp} on num_devices={num_devices}) × "
            f"train.grad_accum_steps={accum} = {step}",
            f"use a multiple of {step}, e.g. {examples}",
        )


def _wrap_spec_error(build: Callable[[], Any], section: str) -> None:
    """Runs a spec's `from_config` whose ValueErrors name `section.field` in their first word."""
    try:
        build()
    except ConfigError:
        raise
    except ValueError as e:
        first = str(e).split("=", 1)[0].split(":", 1)[0].split(" ", 1)[0]
        path = first if first.startswith(f"{section}.") else section
        raise ConfigError(str(e), path) from None
