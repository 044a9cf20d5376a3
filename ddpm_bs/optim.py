"""The optimiser: AdamW with a linear warm-up, then a constant rate (ADM), and global-norm clipping.

`optim.build(optim.OptimSpec.from_config(config.optim))` returns the optax transformation and its
learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import optax

from ddpm_bs import fields


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """The `optim` config section (optax checks none of these, so the spec does)."""

    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    weight_decay: float = 0.0  # decoupled (AdamW)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables

    RULES: ClassVar[dict[str, fields.Check]] = {
        "lr": fields.real(0, low_open=True),
        "warmup_steps": fields.integer(0),
        "weight_decay": fields.real(0),
        "b1": fields.real(0, 1, high_open=True),
        "b2": fields.real(0, 1, high_open=True),
        "eps": fields.real(0, low_open=True),
        "grad_clip": fields.real(0),
    }

    @classmethod
    def from_config(cls, cfg) -> OptimSpec:
        return cls(**fields.read(cfg, "optim", cls.RULES))


def learning_rate(spec: OptimSpec) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant `lr`."""
    if spec.warmup_steps > 0:
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, spec.lr, spec.warmup_steps),
                optax.constant_schedule(spec.lr),
            ],
            [spec.warmup_steps],
        )
    return optax.constant_schedule(spec.lr)


def build(spec: OptimSpec) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW, clipped when `grad_clip` > 0; its learning-rate schedule)."""
    lr = learning_rate(spec)
    adamw = optax.adamw(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(spec.grad_clip), adamw), lr
    return adamw, lr
