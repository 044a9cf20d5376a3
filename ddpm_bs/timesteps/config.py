"""The `timesteps` config section: its one registry, its checks, and what training should warn.

    timesteps.check(config.timesteps, schedule=schedule)  # up front, 'auto' fields too
    if timesteps.needs_interval(config.timesteps): ...   # locate (or load interval.json) first
    sampler = timesteps.from_config(config.timesteps, schedule=schedule, interval=located)
    for line in timesteps.warnings_for(sampler): logging.warning(line)

`SAMPLERS` names every law and the config fields its factory reads; `from_config` is the only
reader of `config.timesteps`, and its errors are one line naming the field
(`timesteps.p=1.5: p must be …; fix it in the config file or with --config.timesteps.p=<value>.`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, NoReturn

from ddpm_bs import fields, schedules
from ddpm_bs.timesteps import laws, loss_aware, ot

AUTO = "auto"
# Below this total-variation distance from uniform a law trains as uniform does. 0.02 is a
# fifth of the smallest departure experiments/REPORT.md's ablations tried (TV 0.10, p = 0.7 or
# 0.9 at t_δ/T = 0.8), none of which differed from uniform beyond seed noise; at TV < 0.02 at
# most 2 % of the draws land elsewhere than uniform's under the best coupling of the two.
NEAR_UNIFORM_TV = 0.02
REPORT = "experiments/REPORT.md"


class Law(NamedTuple):
    """A registered law: its factory and the config fields its arguments come from."""

    factory: Callable[..., laws.Sampler]
    fields: Mapping[str, str]  # factory argument → field of config.timesteps
    takes_schedule: bool = False  # the factory's `schedule` is diffusion.schedule


_OT_FIELDS = {"decay_rate": "decay_rate", "floor": "ot_floor"}
SAMPLERS: dict[str, Law] = {
    "uniform": Law(laws.uniform, {}),
    "bernoulli": Law(laws.bernoulli, {"t_delta": "t_delta", "p": "p"}),
    "piecewise": Law(laws.piecewise, {"boundaries": "boundaries", "masses": "masses"}),
    "beta": Law(laws.beta, {"a": "beta_a", "b": "beta_b"}),
    "lognormal": Law(laws.lognormal, {"p_mean": "p_mean", "p_std": "p_std"}, True),
    "logit_normal": Law(laws.logit_normal, {"mean": "logit_mean", "std": "logit_std"}),
    "loss_aware": Law(
        loss_aware.loss_aware, {"history_per_term": "history", "uniform_prob": "uniform_prob"}
    ),
    "ot_gap": Law(ot.ot_gap, _OT_FIELDS, True),
    "ot_rate": Law(ot.ot_rate, _OT_FIELDS, True),
}
# Every field of config.timesteps: the two every config has, then each law's, in order.
FIELDS = tuple(
    dict.fromkeys(
        ("sampler", "importance_weighting")
        + tuple(f for law in SAMPLERS.values() for f in law.fields.values())
        + ("decay_rate",)  # also read by bernoulli's p='auto'
    )
)


_RULES = {"sampler": fields.one_of(*SAMPLERS), "importance_weighting": fields.boolean}


def _fail(field: str, value: Any, problem: str, fix: str | None = None) -> NoReturn:
    fields.fail(f"timesteps.{field}", value, problem, fix)


def _values(cfg: Any) -> dict[str, Any]:
    """The section's values: sampler and importance_weighting checked, no unknown field."""
    fields.read(cfg, "timesteps", _RULES, others=FIELDS)
    return {name: cfg[name] for name in cfg.keys()}


def _field(values: Mapping[str, Any], field: str) -> Any:
    if field not in values:
        raise fields.ConfigError(
            f"timesteps.{field}: missing; timesteps.sampler={values['sampler']!r} needs it (see "
            "configs/default.py).",
            f"timesteps.{field}",
        )
    value = values[field]
    return tuple(value) if isinstance(value, list) else value


def needs_interval(cfg: Any) -> bool:
    """Whether `from_config(cfg, ...)` needs a located interval (interval.json), i.e. whether
    the law reads t_δ or the W₂ decay rate K from it: bernoulli with t_delta='auto', or with
    p='auto' and decay_rate='auto'; ot_gap and ot_rate with decay_rate='auto'."""
    values = _values(cfg)
    name = values["sampler"]
    if name == "bernoulli":
        auto_k = values.get("p") == AUTO and values.get("decay_rate") == AUTO
        return values.get("t_delta") == AUTO or auto_k
    return "decay_rate" in SAMPLERS[name].fields and values.get("decay_rate") == AUTO


def _located(interval: Mapping[str, Any] | None, field: str, key: str, schedule: Any) -> Any:
    """interval[key] for timesteps.<field>='auto', checked against the run's schedule."""
    path = f"timesteps.{field}"
    where = f"{path}='auto'"
    if interval is None:
        raise fields.ConfigError(
            f"{where}: needs the located interval (interval.json from mode=locate); training "
            "locates it first, or set the field to a number.",
            path,
        )
    try:
        value, located_for = interval[key], (interval["schedule"], interval["num_timesteps"])
    except (KeyError, TypeError) as e:
        raise fields.ConfigError(
            f"{where}: the interval is not a mode=locate result (no {e}); delete interval.json "
            "to locate again.",
            path,
        ) from None
    if located_for != (schedule.name, schedule.num_timesteps):
        raise fields.ConfigError(
            f"{where}: interval.json was located for schedule {located_for[0]!r} with T = "
            f"{located_for[1]}, but this run has diffusion.schedule={schedule.name!r}, "
            f"diffusion.num_timesteps={schedule.num_timesteps}; delete it to locate again.",
            path,
        )
    ok = (
        fields.is_int(value) and 1 <= value <= schedule.num_timesteps
        if key == "t_delta"
        else fields.is_real(value) and value > 0
    )
    if not ok:
        raise fields.ConfigError(
            f"{where}: interval.json has {key}={value!r}, not usable (the W₂ curve did not "
            f"decay enough to fit it); set --config.timesteps.{field}=<value>, or locate again "
            "with more images (interval.num_images) or other sets (interval.set_a/set_b).",
            path,
        )
    return value


def from_config(
    cfg: Any, *, schedule: schedules.Schedule, interval: Mapping[str, Any] | None = None
) -> laws.Sampler:
    """The sampler `config.timesteps` describes, every field checked (one-line errors naming it).

    Args:
      cfg: the `config.timesteps` ConfigDict (or a mapping); unknown fields are an error.
      schedule: the run's `schedules.Schedule`: T, and the schedule name for lognormal and the
        OT laws.
      interval: the dict `interval.run_locate` wrote to interval.json; required when
        `needs_interval(cfg)`. Its 't_delta' replaces t_delta='auto', its 'decay_rate' (K)
        decay_rate='auto'.

    Returns:
      The sampler. `config.timesteps.importance_weighting` is checked here and read by the
      training step.

    Raises:
      fields.ConfigError: a field (or the interval) cannot work; one line naming the field.
    """
    values = _values(cfg)
    name = values["sampler"]
    law = SAMPLERS[name]
    num_timesteps = schedule.num_timesteps
    kwargs = {argument: _field(values, field) for argument, field in law.fields.items()}
    if law.takes_schedule:
        if schedule.name not in schedules.SCHEDULES:
            _fail(
                "sampler",
                name,
                f"needs a named schedule (ᾱ_t in float64), got {schedule.name!r}",
                f"use diffusion.schedule = one of {fields.listing(schedules.SCHEDULES)}",
            )
        kwargs["schedule"] = schedule.name
    if "decay_rate" in kwargs and kwargs["decay_rate"] == AUTO:
        kwargs["decay_rate"] = _located(interval, "decay_rate", "decay_rate", schedule)
    if name == "bernoulli":
        t_delta = kwargs["t_delta"]
        if t_delta == AUTO:
            kwargs["t_delta"] = _located(interval, "t_delta", "t_delta", schedule)
        elif not (fields.is_int(t_delta) and 1 <= t_delta <= num_timesteps):
            _fail(
                "t_delta",
                t_delta,
                f"must be 'auto' or an integer in [1, diffusion.num_timesteps={num_timesteps}] "
                "(the paper's 1-based t_δ; 'auto' locates it with optimal transport)",
                "e.g. --config.timesteps.t_delta=auto",
            )
        if kwargs["p"] == AUTO:
            decay_rate = _field(values, "decay_rate")
            if decay_rate == AUTO:
                decay_rate = _located(interval, "decay_rate", "decay_rate", schedule)
            elif not (fields.is_real(decay_rate) and decay_rate > 0):
                _fail("decay_rate", decay_rate, "must be 'auto' or a finite number > 0")
            if schedule.name not in schedules.SCHEDULES:
                _fail("p", AUTO, f"needs a named schedule, got {schedule.name!r}")
            kwargs["p"] = ot.auto_p(kwargs["t_delta"], decay_rate, schedule.name, num_timesteps)
    try:
        return law.factory(num_timesteps, **kwargs)
    except fields.InvalidArgument as e:
        paths = {argument: f"timesteps.{field}" for argument, field in law.fields.items()}
        raise fields.reword(e, paths, {"timesteps": values}, "timesteps") from None


def check(cfg: Any, *, schedule: schedules.Schedule) -> None:
    """Checks every field of `cfg` as `from_config` does, before any interval is located.

    'auto' fields stand for values the interval will give (t_δ = T, K = 1), so a config that
    needs an interval is checked up front too (e.g. `p=1.5` with `t_delta='auto'`), before the
    locator's minutes of work. Raises the `fields.ConfigError` `from_config` would.
    """
    stand_in = {"t_delta": schedule.num_timesteps, "decay_rate": 1.0}
    stand_in.update(schedule=schedule.name, num_timesteps=schedule.num_timesteps)
    from_config(cfg, schedule=schedule, interval=stand_in)


def warnings_for(sampler: laws.Sampler) -> list[str]:
    """What training should log once about the law it trains with: [] when nothing to say.

    * A law within total-variation distance `NEAR_UNIFORM_TV` of uniform (other than uniform
      itself) trains as uniform does: at the paper's setting p = t_δ/T = 0.8 Algorithm 1 is
      the uniform law but for t_δ (TV 0.001), and experiments/REPORT.md measured no difference.
    * A Bernoulli law with p < t_δ/T puts LESS than uniform mass on the significant interval,
      the opposite of DDPM-BS's intent (e.g. t_δ = 912 located on digits with p = 0.8).
    """
    found = []
    if isinstance(sampler, laws.Bernoulli):
        total, t_delta, p = sampler.num_timesteps, sampler.t_delta, sampler.p
        if p < t_delta / total:
            found.append(
                f"timesteps: bernoulli(t_delta={t_delta}, p={p:g}) puts less than uniform mass "
                f"on the significant interval {{1..t_δ}} (p < t_δ/T = {t_delta / total:.3f}: "
                f"{p * total / t_delta:.2f}/T per step up to t_δ, "
                f"{(1 - p) * total / (total - t_delta + 1):.2f}/T after it), the opposite of "
                "DDPM-BS's intent; raise p above t_δ/T, or set timesteps.p='auto'."
            )
    tv = laws.tv_to_uniform(sampler)
    if not isinstance(sampler, laws.Uniform) and not sampler.stateful and tv < NEAR_UNIFORM_TV:
        found.append(
            f"timesteps: the {_describe(sampler)} law is within total-variation distance "
            f"{tv:.3g} of the uniform law (< {NEAR_UNIFORM_TV}), so it trains as uniform "
            f"sampling does ({REPORT} measured the paper's p = t_δ/T = 0.8, TV 0.001, matching "
            "uniform); choose a law that differs (e.g. timesteps.p='auto', ot_gap, ot_rate)."
        )
    return found


def _describe(sampler: laws.Sampler) -> str:
    if isinstance(sampler, laws.Bernoulli):
        return f"bernoulli(t_delta={sampler.t_delta}, p={sampler.p:g})"
    return type(sampler).__name__


def get_sampler(name: str, num_timesteps: int, **kwargs: Any) -> laws.Sampler:
    """The sampler called `name` (a key of `SAMPLERS`) built from its factory's arguments.

    Example: `get_sampler("bernoulli", 1000, t_delta=800, p=0.8)`.
    """
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"sampler name {name!r} is unknown; valid names: {', '.join(SAMPLERS)}.")
    return SAMPLERS[name].factory(num_timesteps, **kwargs)
