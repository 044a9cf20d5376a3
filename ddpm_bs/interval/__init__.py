"""Locate the significant interval t_δ with optimal transport (the paper's §3.2).

Theorem 1 bounds the 2-Wasserstein distance between two forward-diffused distributions,
W₂(μ_t, μ̂_t) ≤ e^{−K t} W₂(μ_0, μ̂_0) (Eq. 6), and Proposition 2 calls the timesteps where
W₂ has fallen below δ·W₂(μ_0, μ̂_0) (Eq. 7) insignificant. DDPM-BS samples the timesteps before
that point, the significant interval {1..t_δ}, with probability p. This package measures the
curve t ↦ W₂(μ_t, μ̂_t) for two image sets A and B with entropic optimal transport (Eq. 8)
and reads t_δ off it:

* `curve`: the W₂ curve and its estimators (`w2_curve`, `W2Curve`, `grid`, `seed_noise`);
* `sinkhorn`: the Sinkhorn solves behind it (batched over timesteps, warm-started, dense or
  online costs);
* `fit`: Theorem 1's decay rate and Proposition 2's t_δ (`fit_decay_rate`, `locate_t_delta`,
  `t_delta_from_rate`);
* `job`: mode=locate (`IntervalSpec`, `run_locate`) and its interval.json (`load_result`,
  `load_t_delta`).

Timestep indices are 0-based (t = 0 the least noisy); only `locate_t_delta` converts to the
paper's 1-based t_δ.
"""

from ddpm_bs.interval.curve import ESTIMATORS, W2Curve, grid, seed_noise, w2_curve
from ddpm_bs.interval.fit import Located, fit_decay_rate, locate_t_delta, t_delta_from_rate
from ddpm_bs.interval.job import IntervalSpec, load_result, load_t_delta, run_locate
from ddpm_bs.interval.sinkhorn import PAIRS

__all__ = [
    "ESTIMATORS",
    "PAIRS",
    "IntervalSpec",
    "Located",
    "W2Curve",
    "fit_decay_rate",
    "grid",
    "load_result",
    "load_t_delta",
    "locate_t_delta",
    "run_locate",
    "seed_noise",
    "t_delta_from_rate",
    "w2_curve",
]
