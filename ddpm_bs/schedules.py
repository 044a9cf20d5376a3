"""Noise schedules: discrete VP schedules (linear, cosine) and the EDM/VE σ ladder.

Every constant is computed in float64 numpy and stored as float32, so the
schedule is the same on every backend whatever `jax_enable_x64` says.

Timestep indices are 0-based: index t ∈ {0, …, T−1}, t = 0 the least noisy
(the paper's 1-based t_k is index k−1).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import fields

SCHEDULES = ("linear", "cosine")

# EDM (Karras et al. 2022) defaults for the σ ladder.
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


@flax.struct.dataclass
class Schedule:
    """A discrete variance-preserving schedule; every array has shape [T], float32.

    A pytree: pass it to jitted functions as an argument, or close over it.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array  # ᾱ_t
    alphas_cumprod_prev: jax.Array  # ᾱ_{t−1}, with ᾱ_{−1} = 1
    sqrt_alphas_cumprod: jax.Array  # √ᾱ_t
    sqrt_one_minus_alphas_cumprod: jax.Array  # √(1−ᾱ_t)
    sqrt_recip_alphas_cumprod: jax.Array  # 1/√ᾱ_t
    sqrt_recipm1_alphas_cumprod: jax.Array  # √(1/ᾱ_t − 1)
    posterior_variance: jax.Array  # β̃_t = β_t (1−ᾱ_{t−1}) / (1−ᾱ_t)
    posterior_log_variance_clipped: jax.Array  # log β̃_t, with β̃_0 replaced by β̃_1
    posterior_mean_coef1: jax.Array  # coefficient of x0 in μ̃_t
    posterior_mean_coef2: jax.Array  # coefficient of x_t in μ̃_t
    log_betas: jax.Array  # log β_t
    snr: jax.Array  # ᾱ_t / (1−ᾱ_t)
    sigmas: jax.Array  # VE noise level σ_t = √((1−ᾱ_t)/ᾱ_t)
    name: str = flax.struct.field(pytree_node=False, default="custom")
    # β in float64, for what needs more than float32 (respacing, the samplers' coefficients).
    betas64: tuple[float, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear β from 1e-4 to 0.02, scaled by 1000/T as improved-DDPM does. float64 [T]."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """Improved-DDPM's ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T)+s)/(1+s)·π/2), at t = 1..T. float64 [T]."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return f[1:] / f[0]


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """β_t = 1 − ᾱ_t/ᾱ_{t−1} of the cosine schedule, clipped at `max_beta`. float64 [T]."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def schedule_from_betas(betas: np.ndarray, name: str = "custom") -> Schedule:
    """Builds every derived constant from β in float64, then stores float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"betas must lie in (0, 1), got values in [{betas.min()}, {betas.max()}].")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # β̃_0 = 0; improved-DDPM clips the log at t=0 with β̃_1 (for T=1 there is nothing to copy).
    post_log_var = np.log(np.append(post_var[1], post_var[1:]) if betas.size > 1 else betas)
    with np.errstate(divide="ignore"):
        sigmas = np.sqrt((1.0 - ac) / ac)
    arrays = dict(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
        snr=ac / (1.0 - ac),
        sigmas=sigmas,
    )
    return Schedule(
        **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()},
        name=name,
        betas64=tuple(betas.tolist()),
    )


def alphas_cumprod64(schedule: Schedule) -> np.ndarray:
    """ᾱ_t of `schedule` in float64 [T], from the β it was built from."""
    betas = schedule.betas64 or np.asarray(schedule.betas, np.float64)
    return np.cumprod(1.0 - np.asarray(betas, np.float64))


def betas64(name: str, num_timesteps: int) -> np.ndarray:
    """The float64 β of the named schedule (validated as in `get_schedule`)."""
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise fields.InvalidArgument(
            "num_timesteps", f"num_timesteps must be an integer ≥ 1, got {num_timesteps!r}."
        )
    if name == "linear":
        if num_timesteps <= 20:
            raise fields.InvalidArgument(
                "num_timesteps",
                f"num_timesteps={num_timesteps} is too small for the linear schedule: β_T = "
                "0.02·1000/T must stay below 1, so num_timesteps must be ≥ 21.",
            )
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise fields.InvalidArgument(
        "schedule", f"schedule name {name!r} is unknown; valid names: {', '.join(SCHEDULES)}."
    )


_MAX_TIMESTEPS = 2**31 - 1  # timestep indices are int32
DIFFUSION_RULES: dict[str, fields.Check] = {
    "schedule": fields.one_of(*SCHEDULES),
    "num_timesteps": fields.integer(2, _MAX_TIMESTEPS),
}


def from_config(cfg) -> Schedule:
    """The `diffusion` config section's schedule (`schedule`, `num_timesteps`), checked."""
    values = fields.read(cfg, "diffusion", DIFFUSION_RULES)
    try:
        return get_schedule(values["schedule"], values["num_timesteps"])
    except fields.InvalidArgument as e:
        paths = {name: f"diffusion.{name}" for name in DIFFUSION_RULES}
        raise fields.reword(e, paths, {"diffusion": cfg}, "diffusion") from None


def get_schedule(name: str, num_timesteps: int) -> Schedule:
    """Returns the named VP schedule with `num_timesteps` steps.

    Args:
      name: 'linear' (DDPM, Ho et al. 2020, Eq. 4 settings) or 'cosine' (Nichol & Dhariwal 2021, Eq. 17).
      num_timesteps: T ≥ 1.
    """
    return schedule_from_betas(betas64(name, num_timesteps), name)


def respaced(schedule: Schedule, use_timesteps) -> Schedule:
    """`schedule` restricted to the sorted timesteps `use_timesteps` (improved-DDPM §4).

    Keeps ᾱ at the kept steps and sets β_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}, all in float64.
    """
    num_timesteps = schedule.num_timesteps
    keep = np.asarray(sorted(set(int(k) for k in use_timesteps)))
    if keep.size == 0 or keep[0] < 0 or keep[-1] >= num_timesteps:
        raise ValueError(
            f"use_timesteps must be a non-empty subset of [0, {num_timesteps}), got {use_timesteps}."
        )
    ac = alphas_cumprod64(schedule)[keep]
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return schedule_from_betas(betas, f"{schedule.name}-respaced{keep.size}")


def edm_sigmas(
    num_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    append_zero: bool = True,
) -> np.ndarray:
    """EDM's σ ladder (Karras et al. 2022, Eq. 5), descending from σ_max to σ_min.

    σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i = 0..N−1, then σ_N = 0
    when `append_zero`. Returns float32 [N (+1)], computed in float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}.")
    i = np.arange(num_steps, dtype=np.float64)
    frac = i / max(num_steps - 1, 1)
    inv_rho = 1.0 / rho
    sig = (sigma_max**inv_rho + frac * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    if append_zero:
        sig = np.append(sig, 0.0)
    return sig.astype(np.float32)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t/(1−ᾱ_t) at integer timesteps t."""
    return schedule.snr[t]


def vp_to_ve_sigma(alpha_cumprod: jax.Array) -> jax.Array:
    """σ = √((1−ᾱ)/ᾱ): the VE noise level of a VP state scaled by 1/√ᾱ."""
    return jnp.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)


def ve_to_vp_alpha_cumprod(sigma: jax.Array) -> jax.Array:
    """ᾱ = 1/(1+σ²): the inverse of `vp_to_ve_sigma`."""
    return 1.0 / (1.0 + jnp.square(sigma))


def sigma_to_timestep(schedule: Schedule, sigma: jax.Array) -> jax.Array:
    """Nearest discrete timestep to σ in log-σ (for driving a VP model on an EDM grid). int32."""
    log_sig = jnp.log(jnp.maximum(schedule.sigmas, 1e-20))
    log_query = jnp.log(jnp.asarray(sigma, jnp.float32))[..., None]
    dist = jnp.abs(log_query - log_sig.reshape((1,) * (log_query.ndim - 1) + log_sig.shape))
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)
