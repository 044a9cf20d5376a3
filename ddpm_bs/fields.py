"""Config fields: the one-line error every spec raises, and the checks the specs share.

Each config section is read by the frozen dataclass built from it (`optim.OptimSpec`,
`losses.LossSpec.from_config`, `data.DataSpec`, …). A spec lists its fields once, as
`RULES = {name: check}`; `read(cfg, section, RULES)` returns the section's values after
refusing unknown fields (a typo in a config *file* fails as one on the command line does),
missing required fields and bad values, each as one line:

    optim.lr=-1.0: must be a finite number > 0; fix it in the config file or with
    --config.optim.lr=<value>.

(one line in the real message). A check is a function `value -> None | "must be …"`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np

Check = Callable[[Any], "str | None"]
MISSING = object()


class SetupError(ValueError):
    """A known problem with a run's inputs (config, data, workdir), found before work starts.

    Its message is one line that says what to fix; the command line prints it without a
    traceback. Any other exception during setup is a bug and keeps its traceback.
    """


class ConfigError(SetupError):
    """A config field that cannot work. `str(error)` is one line: `path=value: what; fix.`

    Attributes:
      path: the dotted config path of the field ('optim.lr'; a section name when a whole
        section is missing or malformed).
    """

    def __init__(self, message: str, path: str):
        super().__init__(" ".join(message.splitlines()))
        self.path = path


class InvalidArgument(ValueError):
    """A library constructor's bad argument; `argument` names it, so a spec can name the field.

    `str(error)` reads on its own ("p2_k must be ≥ 0, got -1."); `reword` turns it into the
    ConfigError of the config field that holds the argument.
    """

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def reword(
    error: InvalidArgument, paths: Mapping[str, str], config: Any, section: str = ""
) -> ConfigError:
    """`error` as a ConfigError naming the config field (`paths[argument]`) and its value.

    An argument no field holds (derived from several) is reported against `section`.
    """
    message = str(error).rstrip(".")
    path = paths.get(error.argument)
    if path is None:
        return ConfigError(f"{section}: {message}.", section)
    value = lookup(config, path)
    return ConfigError(
        f"{path}={value!r}: {message}; fix it in the config file or with --config.{path}=<value>.",
        path,
    )


def fail(path: str, value: Any, problem: str, fix: str | None = None) -> NoReturn:
    """Raises the ConfigError `path=value: problem; fix.`"""
    fix = fix or f"fix it in the config file or with --config.{path}=<value>"
    raise ConfigError(f"{path}={value!r}: {problem.rstrip('.')}; {fix}.", path)


def read(
    cfg: Any,
    section: str,
    rules: Mapping[str, Check],
    *,
    optional: tuple[str, ...] = (),
    others: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The values of `section` named in `rules`, each checked; raises ConfigError otherwise.

    Args:
      cfg: the section (a ConfigDict or a mapping), or None for a missing section.
      section: its dotted name, for messages ('optim').
      rules: {field: check} of the spec that reads the section.
      optional: fields that may be absent (older configs); absent ones are left out.
      others: fields of the same section that another spec reads (not unknown here).
    """
    if cfg is None or not is_section(cfg):
        raise ConfigError(
            f"{section}={cfg!r}: must be a section (a ConfigDict of fields); start from "
            "configs/default.py's get_config(), which defines every section.",
            section,
        )
    known = [*rules, *others]
    for key in cfg.keys():
        if key not in known:
            unknown(f"{section}.{key}", cfg[key], [f"{section}.{n}" for n in known])
    values = {}
    for name, check in rules.items():
        if name not in cfg:
            if name in optional:
                continue
            raise ConfigError(
                f"{section}.{name}: missing; start from configs/default.py's get_config(), "
                "which defines every field.",
                f"{section}.{name}",
            )
        value = cfg[name]
        problem = check(value)
        if problem:
            fail(f"{section}.{name}", value, problem)
        values[name] = tuple(value) if isinstance(value, list) else value
    return values


def check_known(config: Any, sections: Mapping[str, Callable[[], Any] | None]) -> None:
    """Refuses a top-level key or a section field that no spec reads.

    Args:
      config: the whole config.
      sections: {top-level name: a function giving the section's field names}, or None for a
        top-level field (such as 'seed').
    """
    for key in config.keys():
        if key not in sections:
            unknown(key, config[key], sorted(sections))
    for section, names in sections.items():
        node = config.get(section) if names is not None else None
        if node is None:
            continue
        if not is_section(node):
            raise ConfigError(
                f"{section}={node!r}: must be a section (a ConfigDict of fields); start from "
                "configs/default.py's get_config(), which defines every section.",
                section,
            )
        known = names()
        for key in node.keys():
            if key not in known:
                unknown(f"{section}.{key}", node[key], [f"{section}.{n}" for n in known])


def unknown(path: str, value: Any, known: list[str]) -> NoReturn:
    close = difflib.get_close_matches(path, known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
    raise ConfigError(
        f"{path}={value!r}: unknown field ({hint}); remove it or fix its name "
        "(configs/default.py documents every field).",
        path,
    )


def is_section(node: Any) -> bool:
    return isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "__getitem__"))


def lookup(config: Any, path: str, default: Any = None) -> Any:
    """The value at dotted `path` of `config`, or `default` when a part is missing."""
    node = config
    for key in path.split("."):
        if not is_section(node) or key not in node:
            return default
        node = node[key]
    return node


# --- Checks --------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
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


def integer(low: int | None = None, high: int | None = None, *, or_minus_one: bool = False):
    def check(value):
        if is_int(value) and ((or_minus_one and value == -1) or _in_range(value, low, high)):
            return None
        prefix = "-1 or " if or_minus_one else ""
        return f"must be {prefix}an integer{_range_text(low, high)}"

    return check


def real(low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> Check:
    def check(value):
        if is_real(value) and _in_range(value, low, high, low_open, high_open):
            return None
        return f"must be a finite number{_range_text(low, high, low_open, high_open)}"

    return check


def listing(values) -> str:
    return ", ".join(repr(v) for v in values)


def one_of(*values: Any) -> Check:
    def check(value):
        ok = any(type(value) is type(v) and value == v for v in values)
        return None if ok else f"must be one of {listing(values)}"

    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, (bool, np.bool_)) else "must be True or False"


def string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def path(value: Any) -> str | None:
    """None or a string; '' (what `--config.data.folder=` gives) counts as unset."""
    return None if value is None or isinstance(value, str) else "must be None or a string path"


def optional(check: Check) -> Check:
    def optional_check(value):
        problem = None if value is None else check(value)
        return problem and problem.replace("must be ", "must be None or ", 1)

    return optional_check


def tuple_of(item: Check, what: str, *, non_empty: bool) -> Check:
    def check(value):
        must = f"must be a {'non-empty ' if non_empty else ''}tuple of {what}"
        if not isinstance(value, (tuple, list)) or (non_empty and not value):
            return must
        bad = [x for x in value if item(x) is not None]
        return f"{must}; {bad[0]!r} is not" if bad else None

    return check


def anything(value: Any) -> None:
    """A field whose value the spec's constructor checks itself."""
    return None
