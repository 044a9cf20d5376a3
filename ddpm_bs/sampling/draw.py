"""One entry point for every sampler, its sharded form, and one path that draws image sets.

`sample(method, ...)` dispatches on the name; `sharded_sampler` compiles it once with the batch
split over a mesh; `SampleSpec` reads the `sample` config section and `draw_images` draws a set
of uint8 images for --mode=sample, the sample grids and the evaluations alike.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_bs import fields, schedules
from ddpm_bs.sampling.ancestral import ModelFn, ddim_sample, ddpm_sample
from ddpm_bs.sampling.solvers import (
    SKIP_TYPES,
    dpm_solver_pp_sample,
    dpm_solver_sample,
    edm_sample,
)

METHODS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++", "edm_euler", "edm_heun")

# --- One entry point, and sharding -------------------------------------------------------------


def sample(
    method: str,
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    **opts: Any,
) -> jax.Array:
    """Samples x0 [*shape] float32 with `method` ∈ METHODS; `opts` go to that sampler.

    Common options: steps, target, learn_sigma, clip_denoised, y, batch_sharding. Per method:
    'ddim' eta, eps_scale; 'ddpm' fixed_variance, eps_scale; 'dpm_solver' order (1–3),
    skip_type; 'dpm_solver++' order (1–2), skip_type, lower_order_final; 'edm_*' sigma_min,
    sigma_max, rho.
    """
    samplers = {
        "ddpm": ddpm_sample,
        "ddim": ddim_sample,
        "dpm_solver": dpm_solver_sample,
        "dpm_solver++": dpm_solver_pp_sample,
        "edm_euler": lambda *a, **k: edm_sample(*a, solver="euler", **k),
        "edm_heun": lambda *a, **k: edm_sample(*a, solver="heun", **k),
    }
    if method not in samplers:
        raise ValueError(f"method={method!r} is unknown; valid methods: {', '.join(METHODS)}.")
    return samplers[method](model_fn, schedule, shape, key, **opts)


def sharded_sampler(
    method: str,
    apply_fn: Callable[..., jax.Array],
    mesh: Mesh,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    *,
    axis: str = "data",
    **opts: Any,
) -> Callable[..., jax.Array]:
    """A jitted `fn(params, key, y=None) -> x0 [*shape]` with the batch split over `mesh[axis]`.

    `apply_fn(params, x, t[, y])` is the model with its parameters as an argument (so they are
    not baked into the program); params keep whatever sharding they arrive with (replicated
    for data parallelism). The state, the per-step noise and y are constrained to
    NamedSharding(mesh, P(axis)) inside the loop, and so is the output. With
    `jax_threefry_partitionable` on, the draws, and so the samples, equal the unsharded ones.
    Compile once, call per chunk with fresh keys.
    """
    n = mesh.shape[axis]
    if shape[0] % n:
        raise ValueError(
            f"shape[0]={shape[0]} (samples per call) must be divisible by the {n} devices on "
            f"mesh axis {axis!r}."
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; valid methods: {', '.join(METHODS)}.")
    batch = NamedSharding(mesh, P(axis))

    def fn(params, key, y=None):
        def model_fn(x, t, *rest):
            return apply_fn(params, x, t, *rest)

        return sample(
            method,
            model_fn,
            schedule,
            shape,
            key,
            y=y,
            batch_sharding=batch,
            **opts,
        )

    return jax.jit(fn, out_shardings=batch)


# --- Drawing a set of images: one path for --mode=sample, sample grids and evaluation ----------


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """The `sample` config section's sampler fields (the metric fields are evaluation's)."""

    method: str = "ddim"
    steps: int = 100  # model evaluations (respaced steps for ddpm/ddim)
    num_samples: int = 64
    batch_size: int = 256  # images per compiled call, split over the devices
    eta: float = 0.0  # DDIM's η
    clip_denoised: bool = True
    skip_type: str = "logSNR"  # DPM-Solver step spacing
    eps_scale_k: float = 0.0  # Epsilon Scaling: ε̂ / (k·i + b) for ddpm/ddim; (0, 1) is off
    eps_scale_b: float = 1.0

    RULES: ClassVar[dict[str, fields.Check]] = {
        "method": fields.one_of(*METHODS),
        "steps": fields.integer(1),
        "num_samples": fields.integer(1),
        "batch_size": fields.integer(1),
        "eta": fields.real(0),
        "clip_denoised": fields.boolean,
        "skip_type": fields.one_of(*SKIP_TYPES),
        "eps_scale_k": fields.real(),
        "eps_scale_b": fields.real(),
    }
    OTHERS: ClassVar[tuple[str, ...]] = ("metric", "inception_weights", "reference_stats")

    @classmethod
    def from_config(cls, cfg) -> SampleSpec:
        spec = cls(**fields.read(cfg, "sample", cls.RULES, others=cls.OTHERS))
        k, b, steps = spec.eps_scale_k, spec.eps_scale_b, spec.steps
        if spec.eps_scale and (b <= 0 or k * (steps - 1) + b <= 0):
            # Epsilon Scaling divides ε̂ by λ_i = k·i + b, i = 0 … steps − 1: it must stay > 0.
            path, value = ("sample.eps_scale_b", b) if b <= 0 else ("sample.eps_scale_k", k)
            fields.fail(
                path,
                value,
                f"Epsilon Scaling divides ε̂ by k·i + b, which must stay > 0 for i in "
                f"[0, sample.steps-1={steps - 1}] (k={k}, b={b})",
                "use b > 0 with k ≥ -b/(steps-1) (ADM-ES: k=0, b=1.017; (0, 1) is off)",
            )
        return spec

    def replace(self, **changes) -> SampleSpec:
        return dataclasses.replace(self, **changes)

    @property
    def eps_scale(self) -> tuple[float, float] | None:
        """Epsilon Scaling's (k, b) when the method takes it and it is on; else None."""
        k_b = (self.eps_scale_k, self.eps_scale_b)
        return k_b if self.method in ("ddim", "ddpm") and k_b != (0.0, 1.0) else None

    def options(self, *, target: str, learn_sigma: bool) -> dict[str, Any]:
        """The keyword options of `sample(self.method, ...)` this spec sets."""
        opts: dict[str, Any] = {
            "steps": self.steps,
            "target": target,
            "learn_sigma": learn_sigma,
            "clip_denoised": self.clip_denoised,
        }
        if self.eps_scale:
            opts["eps_scale"] = self.eps_scale
        if self.method in ("dpm_solver", "dpm_solver++"):
            opts["skip_type"] = self.skip_type
        if self.method == "ddim":
            opts["eta"] = self.eta
        return opts


def draw_images(
    spec: SampleSpec,
    model: Any,
    params: Any,
    mesh: Mesh,
    schedule: schedules.Schedule,
    image_shape: tuple[int, int, int],
    key: jax.Array,
    *,
    target: str,
    learn_sigma: bool,
    num_classes: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`spec.num_samples` images of the Flax `model` at `params`, as uint8 [N, H, W, C].

    Chunks of `spec.batch_size` (rounded up to the mesh's `data` axis) go through one compiled
    `sharded_sampler`; chunk c draws with fold_in(key, c), and class-conditional models get labels
    uniform over `num_classes` from fold_in(that key, 1), so a set is reproducible and a longer
    set extends a shorter one. Returns (images, int32 labels [N], empty when unconditional);
    progress (rate, time left) is logged.
    """
    from ddpm_bs import progress  # noqa: PLC0415 (absl logging, only where images are drawn)

    n_data = mesh.shape["data"]
    batch = -(-min(spec.batch_size, spec.num_samples) // n_data) * n_data
    fn = _compiled_sampler(
        spec.method,
        model,
        mesh,
        (schedule.name, schedule.betas64),
        (batch, *image_shape),
        tuple(sorted(spec.options(target=target, learn_sigma=learn_sigma).items())),
    )
    images, labels = [], []
    with progress.Progress("sampling", total=spec.num_samples, unit="img") as bar:
        for chunk in range(-(-spec.num_samples // batch)):
            chunk_key = jax.random.fold_in(key, chunk)
            y = None
            if num_classes:
                y = jax.random.randint(jax.random.fold_in(chunk_key, 1), (batch,), 0, num_classes)
                labels.append(np.asarray(y))
            images.append(to_uint8(fn(params, chunk_key, y)))
            bar.update(min(batch, spec.num_samples - chunk * batch))
    images = np.concatenate(images)[: spec.num_samples]
    labels = np.concatenate(labels)[: spec.num_samples] if labels else np.zeros((0,), np.int32)
    return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _compiled_sampler(method, model, mesh, schedule_key, shape, opts):
    """One `sharded_sampler` per (model, mesh, schedule, shape, options), reused by grids and
    evaluations. `schedule_key` is (name, float64 β): a Schedule's arrays are not hashable."""
    name, betas = schedule_key

    def apply_fn(params, x, t, *y):
        return model.apply({"params": params}, x, t, *y, train=False)

    schedule = schedules.schedule_from_betas(np.asarray(betas), name)
    return sharded_sampler(method, apply_fn, mesh, schedule, shape, **dict(opts))


# --- Images ------------------------------------------------------------------------------------


def to_uint8(x: jax.Array) -> np.ndarray:
    """[−1, 1] float images → uint8 [0, 255] numpy (rounded as guided-diffusion does)."""
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows·(H+2), cols·(W+2), C] grid, 2-pixel gaps."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + 2), ncols * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = img
    return grid
