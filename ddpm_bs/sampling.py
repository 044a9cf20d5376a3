"""Samplers of the reverse process, each a `lax.scan` over its step schedule.

A model enters as `model_fn(x [B, H, W, C], t [B] int32) -> output`, with t indices on the
original T-step grid; the output is in the parameterisation `target` and carries 2C channels
when the model learns its variances.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import diffusion, schedules

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """The timesteps kept when respacing, with guided-diffusion's `section_counts` semantics.

    "ddimN" keeps every k-th step, k chosen so exactly N steps remain, starting at 0; "a,b,c"
    splits [0, T) into equal sections and keeps a, b, c evenly spaced steps in each (the ends
    of each section included). An int N is the same as "N" (one section).
    """
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if section_counts.startswith("ddim"):
        wanted = int(section_counts[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(
            f"section_counts={section_counts!r}: no integer stride gives exactly {wanted} of "
            f"{num_timesteps} steps; use a plain count such as '{wanted}'."
        )
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(
                f"section_counts={section_counts!r}: section {i} has {size} steps, cannot keep {count}."
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not multiplied, so rounding matches guided-diffusion
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclasses.dataclass(frozen=True)
class Respacing:
    """A respaced schedule and the map from its step indices to the original timesteps."""

    schedule: schedules.Schedule
    timestep_map: np.ndarray  # [N] int32: original timestep of each respaced index.


def respace(schedule_name: str, num_timesteps: int, section_counts: str | int) -> Respacing:
    kept = space_timesteps(num_timesteps, section_counts)
    return Respacing(
        schedules.respaced(schedule_name, num_timesteps, kept), np.asarray(kept, np.int32)
    )


def ddim_sample(
    model_fn: ModelFn,
    schedule_name: str,
    num_timesteps: int,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: str | int = 100,
    eta: float = 0.0,
    target: str = "eps",
    learn_sigma: bool = False,
    clip_denoised: bool = True,
) -> jax.Array:
    """DDIM (Song et al. 2021, Eq. 12) on a respaced grid; eta=1 is ancestral-like sampling.

    x_{prev} = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ z,  σ = η √((1−ᾱ_prev)/(1−ᾱ)) √(1−ᾱ/ᾱ_prev).
    Returns x0 samples of `shape` in float32.
    """
    sp = respace(schedule_name, num_timesteps, steps)
    s = sp.schedule

    def step(x, i, t, out, noise):
        if learn_sigma:
            out, _ = diffusion.split_learned_sigma(out, shape[-1])
        x0, eps = diffusion.x0_and_eps_from_output(target, s, x, t, out)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(s, x, t, x0)
        ac = s.alphas_cumprod[i]
        ac_prev = s.alphas_cumprod_prev[i]
        sigma = eta * jnp.sqrt((1 - ac_prev) / (1 - ac)) * jnp.sqrt(1 - ac / ac_prev)
        mean = jnp.sqrt(ac_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ac_prev - sigma**2, 0.0)) * eps
        return mean + jnp.where(i > 0, sigma, 0.0) * noise

    return _reverse_scan(model_fn, sp, shape, key, step)


def ddpm_sample(
    model_fn: ModelFn,
    schedule_name: str,
    num_timesteps: int,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: str | int | None = None,
    target: str = "eps",
    learn_sigma: bool = False,
    fixed_variance: str = "small",
    clip_denoised: bool = True,
) -> jax.Array:
    """Ancestral sampling from p(x_{t−1}|x_t) (DDPM Algorithm 2), optionally respaced."""
    sp = respace(schedule_name, num_timesteps, steps or num_timesteps)
    s = sp.schedule

    def step(x, i, t, out, noise):
        p = diffusion.p_mean_variance(
            s,
            out,
            x,
            t,
            target=target,
            learn_sigma=learn_sigma,
            fixed_variance=fixed_variance,
            clip_denoised=clip_denoised,
        )
        return p["mean"] + jnp.where(i > 0, jnp.exp(0.5 * p["log_variance"]), 0.0) * noise

    return _reverse_scan(model_fn, sp, shape, key, step)


def _reverse_scan(model_fn: ModelFn, sp: Respacing, shape, key, step) -> jax.Array:
    """Runs `step(x, i, t, model_output, noise) -> x` from x ~ N(0, I) down the respaced grid.

    i counts down from N−1 to 0 (the respaced index, t = [i]*B); the model sees the original
    timestep; the noise of step i is drawn from fold_in(key, i), so draws do not depend on N.
    """
    tmap = jnp.asarray(sp.timestep_map)
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, shape, jnp.float32)

    def body(x, i):
        t = jnp.full((shape[0],), i, jnp.int32)
        out = model_fn(x, tmap[t]).astype(jnp.float32)
        noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
        return step(x, i, t, out, noise), None

    x, _ = jax.lax.scan(body, x, jnp.arange(sp.schedule.num_timesteps - 1, -1, -1))
    return x


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
