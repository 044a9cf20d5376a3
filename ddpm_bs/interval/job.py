"""mode=locate: the `interval` config section, the two image sets, and interval.json/.png.

`IntervalSpec` reads and checks `config.interval`; `run_locate` loads the two sets from
`config.data`, measures their W₂ curve (`curve.w2_curve`), reads t_δ off it
(`fit.locate_t_delta`) and writes `<workdir>/interval.json` and `<workdir>/interval.png`;
`load_result` and `load_t_delta` read the JSON back (training's `t_delta='auto'`, the
timestep samplers derived from the curve).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from ddpm_bs import artifacts, schedules
from ddpm_bs import data as data_lib
from ddpm_bs.interval import _checks, fit
from ddpm_bs.interval import curve as curve_lib

RESULT_FILE = "interval.json"
PLOT_FILE = "interval.png"
_INTERVAL_STREAM = 0x1D7  # fold_in constant: the locator's noise is its own stream of config.seed
_PERTURB_STREAM = 0x1D8


@dataclasses.dataclass(frozen=True)
class IntervalSpec:
    """The `interval` section of a config: what `run_locate` compares and how.

    Attributes:
      set_a: the first image set: 'class:<k>' (the images of class k of `config.data`),
        or 'all' (the data set).
      set_b: the second set: 'class:<k>', 'all', or 'perturbed' (set A's images with
        Gaussian pixel noise of std `perturb_std`, clipped to [−1, 1]; for data without
        labels).
      num_images: images per set, at most (a class with fewer uses all it has).
      num_t: grid points over [0, T−1], both ends included (`curve.grid`).
      num_seeds: noise draws averaged.
      delta: Proposition 2's δ on the W₂ ratio W(t)/W(0), in (0, 1).
      epsilon_rel: ε_t = epsilon_rel × mean cost of (A_t, B_t).
      batch_size: None for dense cost matrices; rows per block of ott's online cost.
      estimator: 'debiased_baseline', 'naive' or 'sinkhorn_divergence'.
      max_iterations: Sinkhorn iterations per problem.
      threshold: Sinkhorn's L1 marginal-error tolerance.
      perturb_std: pixel noise std of set_b='perturbed' (images in [−1, 1]).
    """

    set_a: str = "class:0"
    set_b: str = "class:1"
    num_images: int = 500
    num_t: int = 50
    num_seeds: int = 3
    delta: float = 0.1
    epsilon_rel: float = 0.02
    batch_size: int | None = None
    estimator: str = "debiased_baseline"
    max_iterations: int = 1000
    threshold: float = 1e-3
    perturb_std: float = 0.2

    def __post_init__(self):
        _parse_set(self.set_a, "interval.set_a", allow_perturbed=False)
        _parse_set(self.set_b, "interval.set_b", allow_perturbed=True)
        for name, minimum in (("num_images", 1), ("num_t", 2), ("num_seeds", 1)):
            _checks.check_int(f"interval.{name}", getattr(self, name), minimum)
        _checks.check_int("interval.max_iterations", self.max_iterations, 1)
        if self.batch_size is not None:
            _checks.check_int("interval.batch_size", self.batch_size, 1)
        _checks.check_delta("interval.delta", self.delta)
        for name in ("epsilon_rel", "threshold", "perturb_std"):
            _checks.check_positive(f"interval.{name}", getattr(self, name))
        if self.estimator not in curve_lib.ESTIMATORS:
            raise ValueError(
                f"interval.estimator must be one of {curve_lib.ESTIMATORS}, got {self.estimator!r}."
            )
        if self.set_a == self.set_b:
            raise ValueError(
                f"interval.set_b: {self.set_b!r} names the same images as set_a; compare two "
                "different sets (e.g. set_a='class:0', set_b='class:1', or set_b='perturbed')."
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any | None) -> IntervalSpec:
        """Reads a ConfigDict (or mapping) section; missing fields take the defaults.

        Unknown fields are an error naming them.
        """
        if cfg is None:
            return cls()
        values = data_lib.config_section_values(cfg, cls, "interval")
        return cls(**values)


def _parse_set(name: Any, field: str, *, allow_perturbed: bool) -> tuple[str, int | None]:
    """'all' → ('all', None); 'class:k' → ('class', k); 'perturbed' → ('perturbed', None)."""
    valid = "'all', 'class:<k>' (k ≥ 0)" + (" or 'perturbed'" if allow_perturbed else "")
    if isinstance(name, str):
        if name == "all":
            return "all", None
        if name == "perturbed" and allow_perturbed:
            return "perturbed", None
        if name.startswith("class:") and name[6:].isdigit():
            return "class", int(name[6:])
    raise ValueError(f"{field}: unknown set {name!r}; valid: {valid}.")


def _load_sets(
    dspec: data_lib.DataSpec, ispec: IntervalSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The two image sets, [n, H, W, C] and [m, H, W, C] float32 in [−1, 1].

    Class sets take the first `num_images` images of the class in source order; the prefix
    of the source that is loaded doubles until every requested class is filled or the source
    is exhausted.
    """
    kind_a, class_a = _parse_set(ispec.set_a, "interval.set_a", allow_perturbed=False)
    kind_b, class_b = _parse_set(ispec.set_b, "interval.set_b", allow_perturbed=True)
    source = data_lib.open_source(dspec)
    total, num_classes = len(source), source.num_classes
    wanted = [c for c in (class_a, class_b) if c is not None]
    for field, c in (("set_a", class_a), ("set_b", class_b)):
        if c is not None and c >= num_classes:
            raise ValueError(
                f"interval.{field}: class {c} has no images: data {dspec.name!r} has "
                f"{num_classes} class(es), 0..{num_classes - 1}"
                + ("; use set_a='all', set_b='perturbed'." if num_classes == 1 else ".")
            )
    n = ispec.num_images
    prefix = min(total, n * (2 * max(len(wanted), 1) if wanted else 1))
    while True:
        images, labels = data_lib.load_all(dspec, prefix, with_labels=True)
        filled = all(int((labels == c).sum()) >= n for c in wanted)
        if filled or prefix >= total:
            break
        prefix = min(total, 2 * prefix)

    def pick(kind, c, field):
        if kind == "all":
            return images[:n]
        chosen = images[labels == c][:n]
        if chosen.shape[0] == 0:
            raise ValueError(
                f"interval.{field}: class {c} has no images in data {dspec.name!r} "
                f"(split {dspec.split!r})."
            )
        return chosen

    images_a = pick(kind_a, class_a, "set_a")
    if kind_b == "perturbed":
        key = jax.random.fold_in(jax.random.key(seed), _PERTURB_STREAM)
        noise = np.asarray(jax.random.normal(key, images_a.shape, jnp.float32))
        images_b = np.clip(images_a + ispec.perturb_std * noise, -1.0, 1.0)
    else:
        images_b = pick(kind_b, class_b, "set_b")
    return images_a, images_b


def run_locate(config: Any, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Locates t_δ on `config.data` (mode=locate) and writes interval.json and interval.png.

    Reads `config.interval` (see `IntervalSpec`; defaults when the section is absent),
    `config.data`, `config.diffusion.schedule`/`num_timesteps` and `config.seed`; computes
    `curve.w2_curve` over `curve.grid(T, num_t)` and `fit.locate_t_delta` at `delta`; writes,
    atomically (through etils.epath, so `workdir` may be remote, e.g. gs://),
    `<workdir>/interval.json` (every per-t number, K, t_δ, its fraction and the settings)
    and `<workdir>/interval.png` (the normalised curve with its band, the naive curve, the
    fitted exponential e^{−K s(t)}, δ and t_δ).

    Args:
      config: an ml_collections config (see configs/default.py).
      workdir: output directory (created).
      progress: log the settings, the timesteps solved with their rate and the time left
        (`progress.Progress`), and the result.

    Returns:
      The dict written to interval.json; 't_delta' is 1-based, 'fraction' = t_δ/T.
    """
    section = config.get("interval") if hasattr(config, "get") else None
    ispec = IntervalSpec.from_config(section)
    dspec = data_lib.DataSpec.from_config(config.data)
    schedule, total = config.diffusion.schedule, int(config.diffusion.num_timesteps)
    seed = int(config.seed)
    schedules.betas64(schedule, total)  # validate before loading anything
    images_a, images_b = _load_sets(dspec, ispec, seed)
    t_grid = curve_lib.grid(total, ispec.num_t)
    if progress:
        logging.info(
            "Locating t_δ: A = %s (%d images), B = %s (%d), images %s, %d timesteps × %d "
            "seeds, estimator %s, ε = %g × mean cost.",
            ispec.set_a,
            images_a.shape[0],
            ispec.set_b,
            images_b.shape[0],
            images_a.shape[1:],
            len(t_grid),
            ispec.num_seeds,
            ispec.estimator,
            ispec.epsilon_rel,
        )
    curve = curve_lib.w2_curve(
        images_a,
        images_b,
        schedule=schedule,
        num_timesteps=total,
        timesteps=t_grid,
        key=jax.random.fold_in(jax.random.key(seed), _INTERVAL_STREAM),
        num_seeds=ispec.num_seeds,
        estimator=ispec.estimator,
        epsilon_rel=ispec.epsilon_rel,
        batch_size=ispec.batch_size,
        max_iterations=ispec.max_iterations,
        threshold=ispec.threshold,
        progress=progress,
    )
    located = fit.locate_t_delta(curve, ispec.delta)
    result = {
        "t_delta": located.t_delta,
        "fraction": located.fraction,
        "crossed": located.crossed,
        "t_cross": located.t_cross,
        "delta": float(ispec.delta),
        "estimator": ispec.estimator,
        "decay_rate": curve.decay_rate,
        "t_delta_from_rate": fit.t_delta_from_rate(
            curve.decay_rate, ispec.delta, schedule=schedule, num_timesteps=total
        ),
        "schedule": schedule,
        "num_timesteps": total,
        "seed": seed,
        "data": {
            "name": dspec.name,
            "image_shape": list(images_a.shape[1:]),
            "set_a": ispec.set_a,
            "set_b": ispec.set_b,
            "num_a": int(images_a.shape[0]),
            "num_b": int(images_b.shape[0]),
        },
        "interval": dataclasses.asdict(ispec),
        "curve": curve.to_json(),
    }
    if jax.process_index() == 0:
        out_dir = epath.Path(workdir)
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(result, os.fspath(out_dir / RESULT_FILE))
        _plot(curve, located, ispec.delta, os.fspath(out_dir / PLOT_FILE))
    if progress:
        logging.info(
            "t_δ = %d (t_δ/T = %.3f) where W₂(t)/W₂(0) < δ = %g; fitted K = %.3f; %.1f s.",
            located.t_delta,
            located.fraction,
            ispec.delta,
            curve.decay_rate,
            curve.seconds,
        )
    return result


def load_result(workdir_or_path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed interval.json that `run_locate` wrote, or None if there is none.

    Args:
      workdir_or_path: a workdir (a directory: its interval.json is read) or the path of an
        interval.json; local or remote (etils.epath).

    Returns:
      The dict `run_locate` returned, or None when the file does not exist.

    Raises:
      ValueError: the file exists but is not a `run_locate` result (not JSON, or its t_delta
        is not an integer ≥ 1), naming the file.
    """
    path = epath.Path(workdir_or_path)
    if path.is_dir():
        path = path / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        t_delta = result["t_delta"]
        if isinstance(t_delta, bool) or not isinstance(t_delta, int) or t_delta < 1:
            raise TypeError(f"t_delta = {t_delta!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a readable interval.json from mode=locate ({e}); delete it to "
            "locate t_δ again."
        ) from e
    return result


def load_t_delta(workdir: str | os.PathLike) -> int | None:
    """The 1-based t_δ stored in `<workdir>/interval.json` by `run_locate`, or None if absent.

    Raises:
      ValueError: the file exists but is not a `run_locate` result (`load_result`).
    """
    result = load_result(workdir)
    return None if result is None else result["t_delta"]


def _plot(curve: curve_lib.W2Curve, located: fit.Located, delta: float, path: str) -> None:
    """Two panels (linear and log y) of W(t)/W(0) against the 0-based t."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    t = curve.timesteps
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    floor = 1e-3  # lower limit of the log panel
    for ax, log in zip(fig.subplots(1, 2), (False, True), strict=True):
        clip = functools.partial(np.maximum, floor) if log else np.asarray
        ax.plot(t, clip(curve.ratio), color="tab:blue", label=f"{curve.estimator} (mean)")
        ax.fill_between(
            t,
            clip(curve.ratio_band[0]),
            clip(curve.ratio_band[1]),
            color="tab:blue",
            alpha=0.25,
            label=f"±1 std over {curve.num_seeds} seed(s)",
        )
        if curve.estimator != "naive":
            ax.plot(t, clip(curve.naive_ratio), color="tab:red", ls="--", label="naive Eq. 8")
        if math.isfinite(curve.decay_rate):
            ax.plot(
                t,
                clip(np.exp(-curve.decay_rate * curve.s)),
                color="k",
                ls=":",
                label=f"fit e^(−K s(t)), K = {curve.decay_rate:.3f}",
            )
        ax.axhline(delta, color="tab:green", lw=1, label=f"δ = {delta:g}")
        ax.axvline(
            located.t_delta - 1,
            color="tab:purple",
            lw=1,
            label=f"t_δ = {located.t_delta} (t_δ/T = {located.fraction:.3f})",
        )
        ax.set_xlabel("timestep t (0-based)")
        ax.set_ylabel("W₂(t) / W₂(0)")
        ax.set_xlim(0, curve.num_timesteps - 1)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(floor, None)
        else:
            ax.set_ylim(0, None)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"W₂ between forward-diffused sets ({curve.schedule}, T = {curve.num_timesteps}, "
        f"n = {curve.num_a}/{curve.num_b}, d = {curve.dim})",
        fontsize=10,
    )
    artifacts.save_figure(fig, path, dpi=110)
