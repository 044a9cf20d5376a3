"""One up-front check of a whole config: the first problem, on one line, before any compile.

    validate.validate_config(config, num_devices=jax.device_count(), mode="train")

raises `ConfigError` (a `ValueError`) naming the first bad field as its dotted config path with
the value, what the value must be, and what to do, e.g.

    optim.lr=-1.0: must be a finite number > 0; fix it in the config file or with
    --config.optim.lr=<value>.

(one line in the real message). It is pure Python over the config plus the constructors that
already validate their arguments: `unet.UNet` (`check_config`), `timesteps.get_sampler`,
`losses.LossSpec`, `data.DataSpec`, `interval.IntervalSpec` and `schedules.betas64`. Their
messages are reworded to name the config field where they name only an argument. Nothing is
traced, compiled, loaded from disk or initialised, so it takes milliseconds.

What is checked, in this order:

1. Unknown fields, in every section, whatever the mode: ml_collections refuses
   `--config.train.batchsiz=64` on the command line, but a config file that writes
   `c.train.batchsiz = 64` silently adds a field. `_RULES` below is the schema (every field
   of configs/default.py, plus `data.DataSpec`'s optional fields); the `interval` section is
   left to `IntervalSpec.from_config`, which refuses unknown fields itself.
2. The fields and cross-field constraints of the groups the mode uses (`MODE_GROUPS`):

   ========  ======================================================================
   mode      groups
   ========  ======================================================================
   train     seed image data model diffusion timesteps loss optim train mesh batch
             (+ interval when timesteps.t_delta='auto': training locates t_δ first;
             + metric when train.eval_every > 0)
   sample    seed image model diffusion loss sample mesh
   eval      seed metric
   locate    seed image data diffusion interval
   geometry  seed image data model diffusion loss
   ========  ======================================================================

   `image` is data.image_size and data.channels (the shapes); `data` is the rest of the
   section, the source (`data.DataSpec`), which only the modes that read images need;
   `sample` is sample.method/steps/num_samples/batch_size/eta/clip_denoised/skip_type/
   eps_scale_*; `metric` is sample.metric/inception_weights/reference_stats; `batch` is the
   split of train.batch_size over the mesh (needs `num_devices`). A mode ignores the other
   groups: `mode='sample'` does not look at `optim` or `data.folder`, `mode='train'` not at
   `sample.eta`.

Newer fields (`mesh.fsdp`, `train.on_nonfinite`, `data.on_corrupt`, `train.eval_every`,
`train.eval_samples`, `sample.inception_weights`, `sample.reference_stats`) are optional:
checked when present, so older configs still validate.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, NoReturn

import numpy as np

from ddpm_bs import (
    data,
    diffusion,
    evaluation,
    losses,
    sampling,
    schedules,
    sharding,
    timesteps,
)
from ddpm_bs.models import unet

MODES = ("train", "sample", "eval", "locate", "geometry")
_TRAIN_GROUPS = ("seed", "image", "data", "model", "diffusion", "timesteps", "loss", "optim")
MODE_GROUPS = {
    "train": (*_TRAIN_GROUPS, "train", "mesh", "batch"),
    "sample": ("seed", "image", "model", "diffusion", "loss", "sample", "mesh"),
    "eval": ("seed", "metric"),
    "locate": ("seed", "image", "data", "diffusion", "interval"),
    "geometry": ("seed", "image", "data", "model", "diffusion", "loss"),
}
_GROUP_ORDER = (
    "seed",
    "image",
    "data",
    "model",
    "diffusion",
    "timesteps",
    "loss",
    "optim",
    "train",
    "interval",
    "sample",
    "metric",
    "mesh",
    "batch",
)
ON_NONFINITE = ("skip", "halt")  # train.on_nonfinite
SEED_MAX = 2**32 - 1  # jax.random.key keeps 32 bits without x64: 2**32 would collide with 0
_MAX_TIMESTEPS = 2**31 - 1  # timestep indices are int32


class ConfigError(ValueError):
    """A config field that cannot work. `str(error)` is one line: `path=value: what; fix.`

    Attributes:
      path: the dotted config path of the field ('optim.lr'; a section name when a whole
        section is missing or malformed).
    """

    def __init__(self, message: str, path: str):
        super().__init__(" ".join(message.splitlines()))
        self.path = path


# --------------------------------------------------------------------------------------------
# Per-field checks: each returns None for a good value, else what the value must be.

Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def _range_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '≥'} {low}"
    if low is None:
        return f" {'<' if high_open else '≤'} {high}"
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _in_range(value, low, high, low_open=False, high_open=False) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def _integer(low: int | None = None, high: int | None = None, *, or_minus_one: bool = False):
    def check(value):
        if _is_int(value) and ((or_minus_one and value == -1) or _in_range(value, low, high)):
            return None
        prefix = "-1 or " if or_minus_one else ""
        return f"must be {prefix}an integer{_range_text(low, high)}"

    return check


def _real(low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> Check:
    def check(value):
        if _is_real(value) and _in_range(value, low, high, low_open, high_open):
            return None
        return f"must be a finite number{_range_text(low, high, low_open, high_open)}"

    return check


def _one_of(*values: Any) -> Check:
    def check(value):
        ok = any(type(value) is type(v) and value == v for v in values)
        return None if ok else f"must be one of {_listing(values)}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, (bool, np.bool_)) else "must be True or False"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _path(value: Any) -> str | None:
    """None or a string; '' (what `--config.data.folder=` gives) counts as unset."""
    return None if value is None or isinstance(value, str) else "must be None or a string path"


def _optional(check: Check) -> Check:
    def optional_check(value):
        problem = None if value is None else check(value)
        return problem and problem.replace("must be ", "must be None or ", 1)

    return optional_check


def _tuple_of(item: Check, what: str, *, non_empty: bool) -> Check:
    def check(value):
        must = f"must be a {'non-empty ' if non_empty else ''}tuple of {what}"
        if not isinstance(value, (tuple, list)) or (non_empty and not value):
            return must
        bad = [x for x in value if item(x) is not None]
        return f"{must}; {bad[0]!r} is not" if bad else None

    return check


def _delegated(value: Any) -> None:
    """Known field whose value a library constructor checks in the group's cross-field step."""
    return None


def _metric_names(value: Any) -> list[str] | None:
    """sample.metric as a list of names: one name, a comma-separated string, or a tuple."""
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
    elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        names = [name.strip() for name in value]
    else:
        return None
    return names if names and all(names) else None


def _metric(value: Any) -> str | None:
    names = _metric_names(value)
    if names is not None and all(name in evaluation.METRICS for name in names):
        return None
    return (
        f"must be one of {_listing(evaluation.METRICS)}, or a comma-separated list of them "
        "(e.g. 'digits_fid')"
    )


class _Rule(NamedTuple):
    group: str
    check: Check
    required: bool = True


# The schema: every field validate_config knows, the group that checks it, and how.
_RULES: dict[str, _Rule] = {
    "seed": _Rule("seed", _integer(0, SEED_MAX)),
    # data (DataSpec's other fields are added below as optional, checked by DataSpec)
    "data.name": _Rule("data", _string),
    "data.data_dir": _Rule("data", _path),
    "data.folder": _Rule("data", _path),
    "data.split": _Rule("data", _string),
    "data.image_size": _Rule("image", _integer(4)),
    "data.channels": _Rule("image", _one_of(1, 3)),
    "data.random_flip": _Rule("data", _boolean),
    "data.class_conditional": _Rule("data", _boolean),
    # model
    "model.model_channels": _Rule("model", _integer(1)),
    "model.channel_mult": _Rule(
        "model", _tuple_of(_real(0, low_open=True), "numbers > 0", non_empty=True)
    ),
    "model.num_res_blocks": _Rule("model", _integer(1)),
    "model.attention_resolutions": _Rule(
        "model", _tuple_of(_integer(1), "resolutions in pixels", non_empty=False)
    ),
    "model.num_heads": _Rule("model", _integer(1)),
    "model.num_head_channels": _Rule("model", _integer(1, or_minus_one=True)),
    "model.dropout": _Rule("model", _real(0, 1, high_open=True)),
    "model.use_scale_shift_norm": _Rule("model", _boolean),
    "model.resblock_updown": _Rule("model", _boolean),
    "model.learn_sigma": _Rule("model", _boolean),
    "model.num_classes": _Rule("model", _integer(0)),
    "model.dtype": _Rule("model", _one_of(*unet.DTYPES)),
    "model.attention_implementation": _Rule("model", _one_of(*unet.ATTENTION_IMPLEMENTATIONS)),
    # diffusion
    "diffusion.schedule": _Rule("diffusion", _one_of(*schedules.SCHEDULES)),
    "diffusion.num_timesteps": _Rule("diffusion", _integer(2, _MAX_TIMESTEPS)),
    # timesteps: a sampler's own fields are checked by its constructor when it is selected
    "timesteps.sampler": _Rule("timesteps", _one_of(*timesteps.SAMPLERS)),
    "timesteps.importance_weighting": _Rule("timesteps", _boolean),
    **{
        f"timesteps.{field}": _Rule("timesteps", _delegated, required=False)
        for field in (
            "t_delta",
            "p",
            "boundaries",
            "masses",
            "beta_a",
            "beta_b",
            "p_mean",
            "p_std",
            "logit_mean",
            "logit_std",
            "history",
            "uniform_prob",
        )
    },
    # loss: ranges by LossSpec
    "loss.target": _Rule("loss", _one_of(*diffusion.TARGETS)),
    "loss.weighting": _Rule("loss", _one_of(*losses.WEIGHTINGS)),
    "loss.p2_k": _Rule("loss", _real()),
    "loss.p2_gamma": _Rule("loss", _real()),
    "loss.min_snr_gamma": _Rule("loss", _real()),
    "loss.max_weight": _Rule("loss", _optional(_real())),
    # optim (optax checks none of these)
    "optim.lr": _Rule("optim", _real(0, low_open=True)),
    "optim.warmup_steps": _Rule("optim", _integer(0)),
    "optim.weight_decay": _Rule("optim", _real(0)),
    "optim.b1": _Rule("optim", _real(0, 1, high_open=True)),
    "optim.b2": _Rule("optim", _real(0, 1, high_open=True)),
    "optim.eps": _Rule("optim", _real(0, low_open=True)),
    "optim.grad_clip": _Rule("optim", _real(0)),
    # train
    "train.batch_size": _Rule("train", _integer(1)),
    "train.grad_accum_steps": _Rule("train", _integer(1)),
    "train.num_steps": _Rule("train", _integer(1)),
    "train.ema_rates": _Rule(
        "train",
        _tuple_of(_real(0, 1, low_open=True, high_open=True), "rates in (0, 1)", non_empty=True),
    ),
    "train.log_every": _Rule("train", _integer(0)),
    "train.checkpoint_every": _Rule("train", _integer(0)),
    "train.keep_checkpoints": _Rule("train", _integer(1)),
    "train.sample_every": _Rule("train", _integer(0)),
    "train.num_samples": _Rule("train", _integer(1)),
    "train.sample_steps": _Rule("train", _integer(1)),
    "train.on_nonfinite": _Rule("train", _one_of(*ON_NONFINITE), required=False),
    "train.eval_every": _Rule("train", _integer(0), required=False),
    "train.eval_samples": _Rule("train", _integer(2), required=False),
    # sample (mode=sample)
    "sample.method": _Rule("sample", _one_of(*sampling.METHODS)),
    "sample.steps": _Rule("sample", _integer(1)),
    "sample.num_samples": _Rule("sample", _integer(1)),
    "sample.batch_size": _Rule("sample", _integer(1)),
    "sample.eta": _Rule("sample", _real(0)),
    "sample.clip_denoised": _Rule("sample", _boolean),
    "sample.skip_type": _Rule("sample", _one_of(*sampling.SKIP_TYPES)),
    "sample.eps_scale_k": _Rule("sample", _real()),
    "sample.eps_scale_b": _Rule("sample", _real()),
    # metric (mode=eval; train with train.eval_every > 0)
    "sample.metric": _Rule("metric", _metric),
    "sample.inception_weights": _Rule("metric", _path, required=False),
    "sample.reference_stats": _Rule("metric", _path, required=False),
    # mesh
    "mesh.data": _Rule("mesh", _integer(1, or_minus_one=True)),
    "mesh.fsdp": _Rule("mesh", _integer(1, or_minus_one=True), required=False),
}
for _field in dataclasses.fields(data.DataSpec):
    _RULES.setdefault(f"data.{_field.name}", _Rule("data", _delegated, required=False))

# Sections whose fields a library spec checks entirely (unknown fields included).
DELEGATED_SECTIONS = ("interval",)


def known_fields() -> dict[str, tuple[str, ...]]:
    """{section: field names} that validate_config accepts ('' holds the top-level fields)."""
    fields: dict[str, list[str]] = {}
    for path in _RULES:
        section, _, name = path.rpartition(".")
        fields.setdefault(section, []).append(name)
    for section in DELEGATED_SECTIONS:
        fields.setdefault(section, [])
    return {section: tuple(names) for section, names in fields.items()}


# --------------------------------------------------------------------------------------------
# The entry point.


def validate_config(config: Any, *, num_devices: int | None = None, mode: str = "train") -> None:
    """Raises `ConfigError` on the first problem with `config` for `mode`; returns None if none.

    Args:
      config: an ml_collections ConfigDict (or nested mappings) shaped like
        configs/default.py.
      num_devices: devices the run will use (`jax.device_count()`); None skips the checks
        that need it (mesh sizes, the split of train.batch_size over the mesh).
      mode: 'train', 'sample', 'eval', 'locate' or 'geometry': which groups are checked
        (see the module docstring).

    Raises:
      ConfigError: one line naming the dotted field and its value, the valid values or
        range, and what to do.
      ValueError: `mode` or `num_devices` themselves are invalid.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; valid modes: {', '.join(MODES)}.")
    if num_devices is not None and (not _is_int(num_devices) or num_devices < 1):
        raise ValueError(f"num_devices must be None or an integer ≥ 1, got {num_devices!r}.")
    _check_unknown_fields(config)
    groups = set(MODE_GROUPS[mode])
    if mode == "train":
        if _lookup(config, "timesteps.t_delta") == "auto":
            groups.add("interval")
        eval_every = _lookup(config, "train.eval_every")
        if _is_int(eval_every) and eval_every > 0:
            groups.add("metric")
    for group in _GROUP_ORDER:
        if group in groups:
            _check_fields(config, group)
            cross_check = _CROSS_CHECKS.get(group)
            if cross_check is not None:
                cross_check(config, num_devices)


# --------------------------------------------------------------------------------------------
# Helpers.

_MISSING = object()


def _lookup(config: Any, path: str, default: Any = None) -> Any:
    node = config
    for key in path.split("."):
        if not _is_section(node) or key not in node:
            return default
        node = node[key]
    return node


def _is_section(node: Any) -> bool:
    return isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "__getitem__"))


def _listing(values) -> str:
    return ", ".join(repr(v) for v in values)


def _fail(path: str, value: Any, problem: str, fix: str | None = None) -> NoReturn:
    fix = fix or f"fix it in the config file or with --config.{path}=<value>"
    raise ConfigError(f"{path}={value!r}: {problem.rstrip('.')}; {fix}.", path)


def _check_unknown_fields(config: Any) -> None:
    known = known_fields()
    top_level = set(known[""]) | {s for s in known if s}
    for key in config.keys():
        if key not in top_level:
            _unknown(key, config[key], sorted(top_level))
    for section, names in known.items():
        if not section or section in DELEGATED_SECTIONS or section not in config:
            continue
        node = config[section]
        if not _is_section(node):
            raise ConfigError(
                f"{section}={node!r}: must be a section (a ConfigDict of fields); start from "
                "configs/default.py's get_config(), which defines every section.",
                section,
            )
        for key in node.keys():
            if key not in names:
                _unknown(f"{section}.{key}", node[key], [f"{section}.{n}" for n in names])


def _unknown(path: str, value: Any, known: list[str]) -> NoReturn:
    close = difflib.get_close_matches(path, known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
    raise ConfigError(
        f"{path}={value!r}: unknown field ({hint}); remove it or fix its name "
        "(configs/default.py documents every field).",
        path,
    )


def _check_fields(config: Any, group: str) -> None:
    for path, rule in _RULES.items():
        if rule.group != group:
            continue
        section = path.rpartition(".")[0]
        if section and _lookup(config, section, _MISSING) is _MISSING:
            raise ConfigError(
                f"{section}: section missing; start from configs/default.py's get_config(), "
                "which defines every section.",
                section,
            )
        value = _lookup(config, path, _MISSING)
        if value is _MISSING:
            if rule.required:
                raise ConfigError(
                    f"{path}: missing; start from configs/default.py's get_config(), which "
                    "defines every field.",
                    path,
                )
            continue
        problem = rule.check(value)
        if problem:
            _fail(path, value, problem)


def _reworded(error: ValueError, names: Mapping[str, str], config: Any, fallback: str):
    """A library ValueError as a ConfigError naming the config field of the argument it names.

    `names` maps the argument names the library uses (the first word of its messages) to
    dotted config paths.
    """
    message = str(error)
    match = re.match(r"[A-Za-z_][\w.]*", message)
    path = names.get(match.group(0)) if match else None
    if path is None:
        return ConfigError(f"{fallback}: {message}", fallback)
    value = _lookup(config, path)
    return ConfigError(
        f"{path}={value!r}: {message.rstrip('.')}; fix it in the config file or with "
        f"--config.{path}=<value>.",
        path,
    )


def _passed_through(error: ValueError, section: str) -> ConfigError:
    """A library ValueError whose message already names `section.field`."""
    match = re.match(rf"{section}\.\w+", str(error))
    return ConfigError(str(error), match.group(0) if match else section)


# --------------------------------------------------------------------------------------------
# Cross-field checks, one per group, run after that group's fields are known to be well typed.


def _cross_data(config: Any, num_devices: int | None) -> None:
    section = _lookup(config, "data")
    fields = {f.name for f in dataclasses.fields(data.DataSpec)}
    values = {k: section[k] for k in section.keys() if k in fields}
    try:
        data.DataSpec.from_config(values)  # types, folder/name/split consistency; no disk
    except ValueError as e:
        raise _passed_through(e, "data") from None


def _cross_model(config: Any, num_devices: int | None) -> None:
    m = _lookup(config, "model")
    try:
        # Construction only: check_config (image_size vs. levels, GroupNorm widths, attention
        # resolutions the model reaches, heads that divide the channels); nothing initialised.
        unet.UNet(
            image_size=_lookup(config, "data.image_size"),
            in_channels=_lookup(config, "data.channels"),
            model_channels=m["model_channels"],
            learn_sigma=m["learn_sigma"],
            num_res_blocks=m["num_res_blocks"],
            attention_resolutions=tuple(m["attention_resolutions"]),
            dropout=m["dropout"],
            channel_mult=tuple(m["channel_mult"]),
            num_classes=m["num_classes"] or None,
            num_heads=m["num_heads"],
            num_head_channels=m["num_head_channels"],
            use_scale_shift_norm=m["use_scale_shift_norm"],
            resblock_updown=m["resblock_updown"],
            attention_implementation=m["attention_implementation"],
        )
    except ValueError as e:
        names = {f"UNet.{f.name}": f"model.{f.name}" for f in dataclasses.fields(unet.UNet)}
        names.update(
            {
                "UNet.image_size": "data.image_size",
                "UNet.in_channels": "data.channels",
                "UNet.num_heads_upsample": "model.num_heads",  # -1: num_heads on the way up
            }
        )
        raise _reworded(e, names, config, "model") from None

    if m["attention_implementation"] == "cudnn" and m["dtype"] != "bfloat16":
        _fail(
            "model.attention_implementation",
            "cudnn",
            f"cuDNN flash attention needs bf16 compute, but model.dtype={m['dtype']!r}",
            "set --config.model.dtype=bfloat16, or model.attention_implementation to None or 'xla'",
        )


def _cross_diffusion(config: Any, num_devices: int | None) -> None:
    try:
        schedules.betas64(
            _lookup(config, "diffusion.schedule"), _lookup(config, "diffusion.num_timesteps")
        )
    except ValueError as e:
        names = {"num_timesteps": "diffusion.num_timesteps", "schedule": "diffusion.schedule"}
        raise _reworded(e, names, config, "diffusion") from None


def _cross_timesteps(config: Any, num_devices: int | None) -> None:
    name = _lookup(config, "timesteps.sampler")
    num_timesteps = _lookup(config, "diffusion.num_timesteps")
    fields = timesteps.CONFIG_FIELDS[name]
    kwargs = {}
    for argument, field in fields.items():
        value = _lookup(config, f"timesteps.{field}", _MISSING)
        if value is _MISSING:
            raise ConfigError(
                f"timesteps.{field}: missing; timesteps.sampler={name!r} needs it (see "
                "configs/default.py).",
                f"timesteps.{field}",
            )
        kwargs[argument] = tuple(value) if isinstance(value, list) else value
    if name == "lognormal":
        kwargs["schedule"] = _lookup(config, "diffusion.schedule")
    if name == "bernoulli":
        t_delta = kwargs["t_delta"]
        if t_delta == "auto":
            kwargs["t_delta"] = num_timesteps  # 'auto' is located before training; check p
        elif not (_is_int(t_delta) and 1 <= t_delta <= num_timesteps):
            _fail(
                "timesteps.t_delta",
                t_delta,
                f"must be 'auto' or an integer in [1, diffusion.num_timesteps={num_timesteps}] "
                "(the paper's 1-based t_δ; t_δ/T = 0.8 is best)",
                f"e.g. --config.timesteps.t_delta={max(1, round(0.8 * num_timesteps))}",
            )
    try:
        timesteps.get_sampler(name, num_timesteps, **kwargs)  # construction only: no pmf yet
    except ValueError as e:
        names = {argument: f"timesteps.{field}" for argument, field in fields.items()}
        names["num_timesteps"] = "diffusion.num_timesteps"
        raise _reworded(e, names, config, "timesteps") from None


def _cross_loss(config: Any, num_devices: int | None) -> None:
    section = _lookup(config, "loss")
    fields = ("target", "weighting", "p2_k", "p2_gamma", "min_snr_gamma", "max_weight")
    try:
        losses.LossSpec(
            **{f: section[f] for f in fields},
            learn_sigma=_lookup(config, "model.learn_sigma", False),
        )
    except ValueError as e:
        names = {f: f"loss.{f}" for f in fields}
        raise _reworded(e, names, config, "loss") from None


def _cross_train(config: Any, num_devices: int | None) -> None:
    t = _lookup(config, "train")
    if t["batch_size"] % t["grad_accum_steps"]:
        _fail(
            "train.grad_accum_steps",
            t["grad_accum_steps"],
            f"must divide train.batch_size={t['batch_size']} (each step splits the batch into "
            "that many micro-batches)",
            "use a divisor of the batch size",
        )
    num_timesteps = _lookup(config, "diffusion.num_timesteps")
    if t["sample_steps"] > num_timesteps:
        _fail(
            "train.sample_steps",
            t["sample_steps"],
            f"must be an integer in [1, diffusion.num_timesteps={num_timesteps}] (DDIM steps "
            "for the sample grids)",
        )
    conditional = _lookup(config, "data.class_conditional")
    num_classes = _lookup(config, "model.num_classes")
    if conditional and not num_classes:
        _fail(
            "data.class_conditional",
            True,
            "needs model.num_classes > 0 (the model embeds the labels), but it is 0",
            "set --config.model.num_classes to the number of classes, or "
            "data.class_conditional=False",
        )
    if num_classes and not conditional:
        _fail(
            "model.num_classes",
            num_classes,
            "makes the model class-conditional, but data.class_conditional=False feeds no labels",
            "set --config.data.class_conditional=True, or model.num_classes=0",
        )


def _cross_interval(config: Any, num_devices: int | None) -> None:
    from ddpm_bs import interval  # ott-jax: imported only by the modes that locate t_δ

    try:
        interval.IntervalSpec.from_config(_lookup(config, "interval"))
    except ValueError as e:
        raise _passed_through(e, "interval") from None


def _cross_sample(config: Any, num_devices: int | None) -> None:
    s = _lookup(config, "sample")
    num_timesteps = _lookup(config, "diffusion.num_timesteps")
    method, steps = s["method"], s["steps"]
    low = 2 if method in ("dpm_solver", "dpm_solver++") else 1
    if not low <= steps <= num_timesteps:
        _fail(
            "sample.steps",
            steps,
            f"must be an integer in [{low}, diffusion.num_timesteps={num_timesteps}] for "
            f"sample.method={method!r}",
        )
    k, b = s["eps_scale_k"], s["eps_scale_b"]
    if method in ("ddpm", "ddim") and (k, b) != (0.0, 1.0):
        # Epsilon Scaling divides ε̂ by λ_i = k·i + b, i = 0 … steps − 1: it must stay > 0.
        if b <= 0 or k * (steps - 1) + b <= 0:
            path, value = ("sample.eps_scale_b", b) if b <= 0 else ("sample.eps_scale_k", k)
            _fail(
                path,
                value,
                f"Epsilon Scaling divides ε̂ by k·i + b, which must stay > 0 for i in "
                f"[0, sample.steps-1={steps - 1}] (k={k}, b={b})",
                "use b > 0 with k ≥ -b/(steps-1) (ADM-ES: k=0, b=1.017; (0, 1) is off)",
            )


def _resolve_mesh(config: Any, num_devices: int) -> tuple[int, int]:
    """(mesh.data, mesh.fsdp) resolved on `num_devices` by `sharding.mesh_shape` (train's)."""
    data_axis = _lookup(config, "mesh.data")
    fsdp = _lookup(config, "mesh.fsdp", 1)  # absent: a data-only mesh, as train.build_mesh
    try:
        resolved = sharding.mesh_shape(data_axis, fsdp, num_devices)
    except ValueError as e:
        raise _passed_through(e, "mesh") from None
    product = resolved[0] * resolved[1]
    if num_devices % product:  # both explicit: a prefix of the devices, split unevenly by host
        divisors = ", ".join(str(d) for d in range(1, num_devices + 1) if num_devices % d == 0)
        _fail(
            "mesh.fsdp",
            fsdp,
            f"mesh.data={data_axis} × mesh.fsdp={fsdp} = {product} must divide the "
            f"{num_devices} devices: one of {divisors}",
            "change mesh.data or mesh.fsdp, or set one of them to -1",
        )
    return resolved


def _cross_mesh(config: Any, num_devices: int | None) -> None:
    if num_devices is not None:
        _resolve_mesh(config, num_devices)
    elif _lookup(config, "mesh.data") == -1 and _lookup(config, "mesh.fsdp") == -1:
        _fail(
            "mesh.fsdp",
            -1,
            "mesh.data and mesh.fsdp are both -1 (all remaining devices)",
            "set one of them to a size",
        )


def _cross_batch(config: Any, num_devices: int | None) -> None:
    if num_devices is None:
        return
    data_axis, fsdp = _resolve_mesh(config, num_devices)
    shards = data_axis * fsdp
    batch_size = _lookup(config, "train.batch_size")
    accum = _lookup(config, "train.grad_accum_steps")
    step = shards * accum
    if batch_size % step:
        below = batch_size // step * step
        examples = " or ".join(str(v) for v in (below, below + step) if v > 0)
        _fail(
            "train.batch_size",
            batch_size,
            f"must be divisible by the {shards} devices the batch is split over (mesh.data "
            f"× mesh.fsdp = {data_axis} × {fsdp} on num_devices={num_devices}) × "
            f"train.grad_accum_steps={accum} = {step}",
            f"use a multiple of {step}, e.g. {examples}",
        )


def _cross_metric(config: Any, num_devices: int | None) -> None:
    names = _metric_names(_lookup(config, "sample.metric"))
    # Inception metrics need converted weights and, for FID/sFID, reference statistics;
    # nothing is downloaded (evaluation.INCEPTION_METRICS / REFERENCE_METRICS).
    needs = (
        ("sample.inception_weights", getattr(evaluation, "INCEPTION_METRICS", ())),
        ("sample.reference_stats", getattr(evaluation, "REFERENCE_METRICS", ())),
    )
    for path, metrics in needs:
        wanting = [name for name in names if name in metrics]
        if wanting and not _lookup(config, path):
            _fail(
                path,
                _lookup(config, path),
                f"sample.metric={', '.join(wanting)} needs it (a path to an .npz)",
                f"set --config.{path}=<file.npz> (see ddpm_bs.evaluation), or choose "
                "sample.metric=digits_fid",
            )


_CROSS_CHECKS: dict[str, Callable[[Any, int | None], None]] = {
    "data": _cross_data,
    "model": _cross_model,
    "diffusion": _cross_diffusion,
    "timesteps": _cross_timesteps,
    "loss": _cross_loss,
    "train": _cross_train,
    "interval": _cross_interval,
    "sample": _cross_sample,
    "metric": _cross_metric,
    "mesh": _cross_mesh,
    "batch": _cross_batch,
}
