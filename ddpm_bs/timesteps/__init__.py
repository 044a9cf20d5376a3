"""Timestep samplers: which diffusion step each training example is trained on.

DDPM-BS (the paper's Algorithm 1 and Eq. 9) replaces DDPM's uniform timestep law with a
Bernoulli mixture of two uniform laws that puts mass p on the significant interval {1..t_δ}.
This package holds that sampler, the laws users reach for, and laws derived from the whole W₂
curve of Theorem 1, all with one interface:

    from ddpm_bs import timesteps
    sampler = timesteps.bernoulli(num_timesteps=1000, t_delta=800, p=0.8)
    t = sampler(key, (batch,))        # int32 [batch] in [0, T); pure, jit/vmap/shard friendly
    sampler.probs                     # float64 numpy [T], the pmf of the draws

Modules, one job each:
  laws        the stateless samplers (frozen dataclasses drawn by inverse CDF),
              `importance_weights`, `tv_to_uniform`;
  loss_aware  improved-DDPM's loss-aware sampler and its `LossAwareState`;
  ot          `ot_gap` and `ot_rate`, built from the fitted W₂ decay K, and `auto_p`;
  config      `SAMPLERS` (the one registry of names and config fields), `from_config`,
              `check`, `needs_interval` and `warnings_for`.
"""

from ddpm_bs.timesteps.config import (
    AUTO,
    FIELDS,
    NEAR_UNIFORM_TV,
    SAMPLERS,
    check,
    from_config,
    get_sampler,
    needs_interval,
    warnings_for,
)
from ddpm_bs.timesteps.laws import (
    Bernoulli,
    Beta,
    Categorical,
    LogitNormal,
    LogNormal,
    Piecewise,
    Sampler,
    Uniform,
    bernoulli,
    beta,
    categorical,
    importance_weights,
    logit_normal,
    lognormal,
    piecewise,
    tv_to_uniform,
    uniform,
)
from ddpm_bs.timesteps.loss_aware import LossAware, LossAwareState, loss_aware
from ddpm_bs.timesteps.ot import OTGap, OTRate, auto_p, normalized_w2, ot_gap, ot_rate

__all__ = [
    "AUTO",
    "FIELDS",
    "NEAR_UNIFORM_TV",
    "SAMPLERS",
    "Bernoulli",
    "Beta",
    "Categorical",
    "LogNormal",
    "LogitNormal",
    "LossAware",
    "LossAwareState",
    "OTGap",
    "OTRate",
    "Piecewise",
    "Sampler",
    "Uniform",
    "auto_p",
    "bernoulli",
    "beta",
    "categorical",
    "check",
    "from_config",
    "get_sampler",
    "importance_weights",
    "logit_normal",
    "lognormal",
    "loss_aware",
    "needs_interval",
    "normalized_w2",
    "ot_gap",
    "ot_rate",
    "piecewise",
    "tv_to_uniform",
    "uniform",
    "warnings_for",
]
