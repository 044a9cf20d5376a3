"""Timestep laws derived from the W₂ curve of Theorem 1, rather than from one threshold on it.

Theorem 1 (Eq. 6) bounds the 2-Wasserstein distance between two forward-diffused data
distributions by an exponential decay, and `ddpm_bs.interval` measures it: the normalised
curve is fitted as

    W(t) = W₂(μ_t, μ̂_t) / W₂(μ_0, μ̂_0) ≈ exp(−K·s(t)),   s(t) = −log ᾱ_t

(0-based t; s is the integrated β of the VP SDE; K = ½ for two laws that differ by a
translation; `interval.json` stores the fitted K as 'decay_rate'). Proposition 2 (Eq. 7) keeps
only one threshold of it, W(t_δ) = δ, and Algorithm 1 samples {1..t_δ} with probability p. The
laws here keep the whole curve:

* `ot_gap`: p(t) ∝ W(t), mass where the two diffused distributions still differ;
* `ot_rate`: p(t) ∝ W(t−1) − W(t) (the discrete −dW/dt), mass where they become alike fastest;

each mixed with a uniform floor, (1 − floor)·law + floor/T, so that no timestep is starved
(the denoiser must still be trained at every t it will be sampled at). Both are built from
the fitted K, not the measured points: the tail of the measured curve is the estimator's noise
floor (a W₂ ratio of 0.01–0.05 for a few hundred images, where seeds disagree), which the fit
excludes (`interval.fit_decay_rate`), and a law defined by three scalars (K, schedule, T) keeps
the sampler a small hashable dataclass.

`auto_p` gives Algorithm 1 the p that pairs with a located t_δ: the share of ot_gap's mass
(without floor) on the significant interval.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddpm_bs.timesteps import laws


def normalized_w2(decay_rate: float, schedule: str, num_timesteps: int) -> np.ndarray:
    """W(t)/W(0) ≈ exp(−K·s(t)), s(t) = −log ᾱ_t, of Theorem 1 with the fitted K: float64 [T]."""
    return np.exp(decay_rate * np.log(laws.alphas_cumprod64(schedule, num_timesteps)))


@dataclasses.dataclass(frozen=True)
class _OTLaw(laws.Sampler):
    """A law built from the fitted W₂ decay, mixed with a uniform floor."""

    num_timesteps: int
    decay_rate: float
    schedule: str = "cosine"
    floor: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", laws.check_num_timesteps(self.num_timesteps))
        decay_rate = laws.check_real("decay_rate", self.decay_rate, 0.0, low_open=True)
        object.__setattr__(self, "decay_rate", decay_rate)
        laws.check_schedule(self.schedule)
        object.__setattr__(self, "floor", laws.check_real("floor", self.floor, 0.0, 1.0))

    def _shape(self) -> np.ndarray:
        """The law before the floor, unnormalised, [T], non-negative with a positive sum."""
        raise NotImplementedError

    def _pmf(self):
        shape = self._shape()
        return (1.0 - self.floor) * shape / shape.sum() + self.floor / self.num_timesteps


@dataclasses.dataclass(frozen=True)
class OTGap(_OTLaw):
    """p(t) ∝ W(t)/W(0) with a uniform floor; see `ot_gap`."""

    def _shape(self):
        return normalized_w2(self.decay_rate, self.schedule, self.num_timesteps)


@dataclasses.dataclass(frozen=True)
class OTRate(_OTLaw):
    """p(t) ∝ W(t−1) − W(t) with a uniform floor; see `ot_rate`."""

    def _shape(self):
        w = normalized_w2(self.decay_rate, self.schedule, self.num_timesteps)
        return np.diff(w, prepend=1.0)  # W(−1) = 1: ᾱ_{−1} = 1, nothing diffused yet


def ot_gap(
    num_timesteps: int, decay_rate: float, schedule: str = "cosine", floor: float = 0.1
) -> OTGap:
    """Mass where the diffused distributions still differ: p(t) ∝ W(t)/W(0), plus a floor.

    probs[t] = (1 − floor)·W(t)/Σ_τ W(τ) + floor/T, W(t) = exp(−K·s(t)), s(t) = −log ᾱ_t.

    Why (Theorem 1, Proposition 2): the paper trains more on the significant interval, the
    t where W(t) > δ, because there the model must still tell the data apart; Algorithm 1
    does so for one δ. Since W(t) = ∫₀¹ 1[W(t) > δ] dδ, this law is Proposition 2's
    significant-interval indicator averaged over every threshold δ ∈ (0, 1): each t gets mass
    in proportion to how many thresholds still call it significant, so no δ (or p) is chosen
    by hand, and it decreases with t as the bound e^{−K s(t)} of Eq. 6 does.

    Args:
      num_timesteps: T ≥ 1.
      decay_rate: K > 0 of Eq. 6 in units of s (interval.json's 'decay_rate').
      schedule: 'linear' or 'cosine', the schedule whose ᾱ_t gives s(t).
      floor: mass spread uniformly over all T steps, in [0, 1].
    """
    return OTGap(num_timesteps, decay_rate, schedule, floor)


def ot_rate(
    num_timesteps: int, decay_rate: float, schedule: str = "cosine", floor: float = 0.1
) -> OTRate:
    """Mass where the diffused distributions become alike fastest: p(t) ∝ −dW/dt, plus a floor.

    probs[t] = (1 − floor)·g(t)/Σ_τ g(τ) + floor/T, g(t) = W(t−1) − W(t) with W(−1) = 1,
    W(t) = exp(−K·s(t)): the fall of the fitted curve over step t, the discrete form of
    −dW/dt = K·(ds/dt)·W(t) (ds/dt ≈ β_t). It is smooth (a difference of the fitted decay,
    not of the noisy measured points).

    Why (Theorem 1, Proposition 2): g(t) is the probability that a threshold δ drawn uniformly
    from (W(T−1), 1) is crossed at step t, i.e. the law of Proposition 2's t_δ when δ is not
    fixed. These are the steps where the data's distinguishing information is being destroyed
    by the noise, so where the reverse process has the most of it to restore; with ᾱ_t falling
    slowly at first and W small at the end, the mass peaks in the middle of the schedule.

    Args:
      num_timesteps: T ≥ 1.
      decay_rate: K > 0 of Eq. 6 in units of s (interval.json's 'decay_rate').
      schedule: 'linear' or 'cosine', the schedule whose ᾱ_t gives s(t).
      floor: mass spread uniformly over all T steps, in [0, 1].
    """
    return OTRate(num_timesteps, decay_rate, schedule, floor)


def auto_p(t_delta: int, decay_rate: float, schedule: str, num_timesteps: int) -> float:
    """Algorithm 1's p for a t_δ: the share of W's area on {1..t_δ}, Σ_{t<t_δ} W(t) / Σ_t W(t).

    This is the mass `ot_gap` (floor 0) puts on the significant interval, so `bernoulli(T,
    t_δ, auto_p(...))` is the two-piece law closest in spirit to it. Because W decreases, the
    mean of W over the first t_δ steps exceeds its mean over all T, so p > t_δ/T whenever
    t_δ < T: the law always puts more than uniform mass on the significant interval.
    """
    w = normalized_w2(decay_rate, schedule, num_timesteps)
    return float(w[:t_delta].sum() / w.sum())
