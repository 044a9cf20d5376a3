"""The denoising loss: one regression with a pluggable target and weighting, plus the hybrid VLB.

Each weighting is defined on the ε-prediction MSE as its paper states it, and
converted exactly to the chosen target so the objective is the same function of
the x0 the model implies. With fixed x_t, the errors of the three parameterisations
are tied by ‖Δε‖² = SNR·‖Δx0‖² = SNR/(1+SNR)·‖Δv‖², so a weight λ_ε on the ε-MSE
is λ_ε·SNR on the x0-MSE and λ_ε·SNR/(1+SNR) on the v-MSE:

- 'none': plain MSE on the chosen target (L_simple, DDPM Eq. 14, for 'eps').
- 'p2': λ_ε = 1/(k + SNR)^γ (Choi et al. 2022, Eq. 8).
- 'min_snr': λ_ε = min(SNR, γ)/SNR, i.e. min(SNR, γ) on x0 and min(SNR, γ)/(SNR+1) on v
  (Hang et al. 2023, Eqs. 6 and 7).
- 'debias': λ_ε = 1/√SNR (Yu et al. 2024).

Weights are per example (each example's own SNR); nothing is reduced over the batch.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from ddpm_bs import diffusion, fields, schedules

WEIGHTINGS = ("none", "p2", "min_snr", "debias")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the training loss is.

    Attributes:
      target: the model's parameterisation, 'eps', 'x0' or 'v'.
      weighting: 'none', 'p2', 'min_snr' or 'debias' (see the module docstring).
      p2_k: P2's k (the paper uses 1).
      p2_gamma: P2's γ (0 is no weighting; the paper uses 0.5 or 1).
      min_snr_gamma: Min-SNR's γ (the paper uses 5).
      max_weight: an optional cap on the per-example weight (e.g. for 'debias', whose 1/√SNR is
        ≈2·10⁴ at the last step of the cosine schedule); None for no cap.
      learn_sigma: add improved-DDPM's VLB term for a model with learned variances (hybrid loss).
    """

    target: str = "eps"
    weighting: str = "none"
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    min_snr_gamma: float = 5.0
    max_weight: float | None = None
    learn_sigma: bool = False

    RULES: ClassVar[dict[str, fields.Check]] = {
        "target": fields.one_of(*diffusion.TARGETS),
        "weighting": fields.one_of(*WEIGHTINGS),
        "p2_k": fields.real(),
        "p2_gamma": fields.real(),
        "min_snr_gamma": fields.real(),
        "max_weight": fields.optional(fields.real()),
    }

    @classmethod
    def from_config(cls, cfg, *, learn_sigma: bool) -> LossSpec:
        """The `loss` section (with `model.learn_sigma`, which adds the VLB term)."""
        values = fields.read(cfg, "loss", cls.RULES)
        try:
            return cls(**values, learn_sigma=learn_sigma)
        except fields.InvalidArgument as e:
            paths = {name: f"loss.{name}" for name in cls.RULES}
            raise fields.reword(e, paths, {"loss": cfg}) from None

    def __post_init__(self):
        if self.target not in diffusion.TARGETS:
            raise fields.InvalidArgument(
                "target",
                f"loss target {self.target!r} is unknown; valid targets: "
                f"{', '.join(diffusion.TARGETS)}.",
            )
        if self.weighting not in WEIGHTINGS:
            raise fields.InvalidArgument(
                "weighting",
                f"loss weighting {self.weighting!r} is unknown; valid weightings: "
                f"{', '.join(WEIGHTINGS)}.",
            )
        if self.p2_k < 0:
            raise fields.InvalidArgument("p2_k", f"p2_k must be ≥ 0, got {self.p2_k}.")
        if self.p2_gamma < 0:
            raise fields.InvalidArgument("p2_gamma", f"p2_gamma must be ≥ 0, got {self.p2_gamma}.")
        if self.p2_k == 0 and self.weighting == "p2" and self.p2_gamma > 0:
            raise fields.InvalidArgument(
                "p2_k", "p2_k must be > 0 when p2_gamma > 0 (the weight 1/SNR^γ is unbounded)."
            )
        if self.min_snr_gamma <= 0:
            raise fields.InvalidArgument(
                "min_snr_gamma", f"min_snr_gamma must be > 0, got {self.min_snr_gamma}."
            )
        if self.max_weight is not None and self.max_weight <= 0:
            raise fields.InvalidArgument(
                "max_weight", f"max_weight must be > 0 or None, got {self.max_weight}."
            )


def eps_weight(spec: LossSpec, snr: jax.Array) -> jax.Array:
    """The weighting λ_ε(SNR) on the ε-MSE, per example."""
    if spec.weighting == "p2":
        return 1.0 / jnp.power(spec.p2_k + snr, spec.p2_gamma)
    if spec.weighting == "min_snr":
        return jnp.minimum(snr, spec.min_snr_gamma) / snr
    if spec.weighting == "debias":
        return 1.0 / jnp.sqrt(snr)
    return jnp.ones_like(snr)


def target_factor(target: str, snr: jax.Array) -> jax.Array:
    """c with ‖Δε‖² = c·‖Δtarget‖² at fixed x_t: 1 for 'eps', SNR for 'x0', SNR/(1+SNR) for 'v'."""
    if target == "x0":
        return snr
    if target == "v":
        return snr / (1.0 + snr)
    return jnp.ones_like(snr)


def loss_weight(spec: LossSpec, snr: jax.Array) -> jax.Array:
    """Per-example weight on the MSE of `spec.target`. snr: [B] → [B] float32."""
    snr = snr.astype(jnp.float32)
    if spec.weighting == "none":
        weight = jnp.ones_like(snr)
    else:
        weight = eps_weight(spec, snr) * target_factor(spec.target, snr)
    if spec.max_weight is not None:
        weight = jnp.minimum(weight, spec.max_weight)
    return weight


def per_example_loss(
    spec: LossSpec,
    schedule: schedules.Schedule,
    output: jax.Array,
    x0: jax.Array,
    xt: jax.Array,
    t: jax.Array,
    noise: jax.Array,
) -> dict[str, jax.Array]:
    """The training loss of each example, in float32.

    Args:
      spec: the loss.
      schedule: the diffusion schedule.
      output: model output [B, H, W, C] (or [B, H, W, 2C] when `spec.learn_sigma`).
      x0: clean images [B, H, W, C]; xt = q_sample(schedule, x0, t, noise).
      t: timesteps [B] int32.
      noise: the ε used to make xt.

    Returns:
      'loss' [B] = weight·mse (+ vb); 'mse' [B] unweighted target MSE; 'vb' [B] the VLB term in
      bits/dim scaled by T/1000 as improved-DDPM's hybrid loss does (zeros without learned sigma);
      'weight' [B].
    """
    output = output.astype(jnp.float32)
    if spec.learn_sigma:
        mean_out, var_values = diffusion.split_learned_sigma(output, x0.shape[-1])
    else:
        if output.shape != x0.shape:
            raise ValueError(
                f"model output shape {output.shape} must equal the image shape {x0.shape} "
                "(set learn_sigma when the model outputs 2C channels)."
            )
        mean_out = output
    target = diffusion.target_of(spec.target, schedule, x0, noise, t)
    mse = jnp.mean(jnp.square(target - mean_out), axis=tuple(range(1, x0.ndim)))
    weight = loss_weight(spec, schedule.snr[t])
    loss = weight * mse
    vb = jnp.zeros_like(mse)
    if spec.learn_sigma:
        # The VLB trains only the variance: the mean output is frozen (improved-DDPM §3.1).
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_values], axis=-1)
        p = diffusion.p_mean_variance(
            schedule, frozen, xt, t, target=spec.target, learn_sigma=True, clip_denoised=False
        )
        vb = diffusion.vb_terms_bpd(schedule, p["mean"], p["log_variance"], x0, xt, t)
        vb = vb * (schedule.num_timesteps / 1000.0)
        loss = loss + vb
    return {"loss": loss, "mse": mse, "vb": vb, "weight": weight}
