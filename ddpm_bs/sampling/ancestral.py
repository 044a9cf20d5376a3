"""DDPM and DDIM on guided-diffusion's respaced grids, each a `lax.scan` (with Epsilon Scaling).

Also the respacing itself (`space_timesteps`, `respace`) and the helpers every sampler shares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import diffusion, schedules

ModelFn = Callable[..., jax.Array]


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


def respace(schedule: schedules.Schedule, section_counts: str | int) -> Respacing:
    """`schedule` on guided-diffusion's respaced grid (`space_timesteps`)."""
    kept = space_timesteps(schedule.num_timesteps, section_counts)
    return Respacing(schedules.respaced(schedule, kept), np.asarray(kept, np.int32))


# --- DDIM and DDPM (respaced, optionally stochastic) -------------------------------------------


def ddim_sample(
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: str | int = 100,
    eta: float = 0.0,
    target: str = "eps",
    learn_sigma: bool = False,
    clip_denoised: bool = True,
    eps_scale: tuple[float, float] = (0.0, 1.0),
    y: jax.Array | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """DDIM (Song et al. 2021, Eq. 12) on a respaced grid; eta=1 is ancestral-like sampling.

    x_{prev} = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ z,  σ = η √((1−ᾱ_prev)/(1−ᾱ)) √(1−ᾱ/ᾱ_prev).

    Args:
      steps: respacing (`space_timesteps`): a count, "a,b,c" sections or "ddimN".
      eps_scale: Epsilon Scaling (k, b): ε̂ is divided by λ_i = k·i + b before x̂0 is formed,
        i ∈ {0..N−1} the respaced step index (0 the last, least noisy step), as ADM-ES indexes
        its `eps_scaler`; (0, 1) is off; ADM-ES uses (0, 1.017) for CIFAR-10 at N = 100 (DDPM).
      y: class labels [B] passed to `model_fn(x, t, y)`; None for unconditional models.
      batch_sharding: if given, the state is constrained to it at every step (see
        `sharded_sampler`).
    Returns x0 samples of `shape` in float32.
    """
    num_timesteps = schedule.num_timesteps
    _check_steps(steps, num_timesteps)
    sp = respace(schedule, steps)
    s = sp.schedule

    def step(x, i, t, out, noise):
        if learn_sigma:
            out, _ = diffusion.split_learned_sigma(out, shape[-1])
        out = _scale_eps(out, eps_scale, i, target, s, x, t)
        x0, eps = diffusion.x0_and_eps_from_output(target, s, x, t, out)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(s, x, t, x0)
        ac = s.alphas_cumprod[i]
        ac_prev = s.alphas_cumprod_prev[i]
        sigma = eta * jnp.sqrt((1 - ac_prev) / (1 - ac)) * jnp.sqrt(1 - ac / ac_prev)
        mean = jnp.sqrt(ac_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ac_prev - sigma**2, 0.0)) * eps
        return mean + jnp.where(i > 0, sigma, 0.0) * noise

    deterministic = isinstance(eta, (int, float)) and eta == 0
    return _reverse_scan(model_fn, sp, shape, key, step, y, batch_sharding, not deterministic)


def ddpm_sample(
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: str | int | None = None,
    target: str = "eps",
    learn_sigma: bool = False,
    fixed_variance: str = "small",
    clip_denoised: bool = True,
    eps_scale: tuple[float, float] = (0.0, 1.0),
    y: jax.Array | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """Ancestral sampling from p(x_{t−1}|x_t) (DDPM Algorithm 2), optionally respaced.

    `eps_scale`, `y` and `batch_sharding` as in `ddim_sample`; with Epsilon Scaling only the
    mean channels are rescaled (a learned variance is left as the model gave it).
    """
    num_timesteps = schedule.num_timesteps
    steps = num_timesteps if steps is None else steps
    _check_steps(steps, num_timesteps)
    sp = respace(schedule, steps)
    s = sp.schedule

    def step(x, i, t, out, noise):
        if _scaling_on(eps_scale):
            var = None
            if learn_sigma:
                out, var = diffusion.split_learned_sigma(out, shape[-1])
            out = _scale_eps(out, eps_scale, i, target, s, x, t)
            if learn_sigma:
                out = jnp.concatenate([out, var], axis=-1)
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

    return _reverse_scan(model_fn, sp, shape, key, step, y, batch_sharding)


def _scaling_on(eps_scale) -> bool:
    k, b = eps_scale
    return not (k == 0 and b == 1)


def _scale_eps(out, eps_scale, i, target, s, x, t):
    """The model output with its implied ε̂ divided by λ_i = k·i + b (Ning et al. 2024, Epsilon Scaling).

    For target 'eps' that is out/λ_i; for 'x0' and 'v' the output is rewritten so that it
    implies (x̂0', ε̂/λ_i) with x̂0' = (x − √(1−ᾱ) ε̂/λ_i)/√ᾱ, as ADM-ES forms x̂0 from the scaled ε̂.
    (0, 1) returns `out` untouched.
    """
    if not _scaling_on(eps_scale):
        return out
    k, b = eps_scale
    lam = k * i.astype(jnp.float32) + b
    if target == "eps":
        return out / lam
    _, eps = diffusion.x0_and_eps_from_output(target, s, x, t, out)
    eps = eps / lam
    x0 = diffusion.predict_x0_from_eps(s, x, t, eps)
    return diffusion.target_of(target, s, x0, eps, t)


def _reverse_scan(
    model_fn: ModelFn, sp: Respacing, shape, key, step, y=None, batch_sharding=None, noisy=True
) -> jax.Array:
    """Runs `step(x, i, t, model_output, noise) -> x` from x ~ N(0, I) down the respaced grid.

    i counts down from N−1 to 0 (the respaced index, t = [i]*B); the model sees the original
    timestep; the noise of step i is drawn from fold_in(key, i), so draws do not depend on N.
    `noisy=False` passes zeros instead (deterministic DDIM skips the draws; same result).
    """
    tmap = jnp.asarray(sp.timestep_map)
    init_key, loop_key = jax.random.split(key)
    x = _constrain(jax.random.normal(init_key, shape, jnp.float32), batch_sharding)
    y = _constrain(y, batch_sharding)

    def body(x, i):
        t = jnp.full((shape[0],), i, jnp.int32)
        out = _apply(model_fn, x, tmap[t], y).astype(jnp.float32)
        if noisy:
            noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
        else:
            noise = jnp.zeros(shape, jnp.float32)
        x = step(x, i, t, out, _constrain(noise, batch_sharding))
        return _constrain(x, batch_sharding), None

    x, _ = jax.lax.scan(body, x, jnp.arange(sp.schedule.num_timesteps - 1, -1, -1))
    return x


def _apply(model_fn: ModelFn, x, t, y):
    return model_fn(x, t) if y is None else model_fn(x, t, y)


def _constrain(x, sharding):
    if x is None or sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def _check_steps(steps, num_timesteps: int, minimum: int = 1) -> None:
    if isinstance(steps, str):
        return  # section counts: space_timesteps validates them
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"steps must be an int or a section-count string, got {steps!r}.")
    if not minimum <= steps <= num_timesteps:
        raise ValueError(
            f"steps={steps} is out of range: need {minimum} ≤ steps ≤ num_timesteps={num_timesteps}."
        )
