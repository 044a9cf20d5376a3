"""The timestep laws: one frozen dataclass per law, each drawn by inverting its CDF.

Every sampler has one interface:

    sampler = timesteps.bernoulli(num_timesteps=1000, t_delta=800, p=0.8)
    t = sampler(key, (batch,))        # int32 [batch] in [0, T); pure, jit/vmap/shard friendly
    sampler.probs                     # float64 numpy [T], the pmf of the draws
    u = sampler.continuous(key, (batch,))   # float32 in (0, 1), for continuous-time training

Timestep indices are 0-based, t ∈ {0..T−1}, t = 0 the least noisy; the paper's 1-based t_k is
index k−1.

One draw, one uniform number. Each law turns u ~ U[0, 1) (`jax.random.uniform`, float32) into
an index by inverting its CDF: `jnp.searchsorted` on the float32 cumulative `probs`, or, for
`bernoulli`, Algorithm 1 itself (which is the inverse CDF of its mixture; see `Bernoulli`).
The index is monotone in u, so two laws given the same key draw quantile-coupled timesteps: a
paired comparison of two laws (same seed) differs by the law, not by the randomness. Each
index's probability differs from `probs` by float32 resolution (u is a multiple of 2⁻²³), far
below what any statistical test of a run can see. Drawing costs what the random numbers cost:
at batch 128 and 1,024 it is well under 1 % of the smallest train step (bench/RESULTS.md).

Every sampler is a frozen dataclass holding only scalars and tuples, so it is hashable, can be
a static argument of `jax.jit`, and carries no hidden state. Derived tables (pmf, CDF) are
computed once in float64 numpy and cached on the instance; equality and hashing use the
parameters only. The one stateful sampler, `loss_aware` (its own module), keeps its state in an
explicit `LossAwareState` pytree that the training step threads through (and the checkpoint
stores).

Continuous time (`continuous`, float32 u ∈ (0, 1), u small = little noise): `beta` and
`logit_normal` sample their continuous laws exactly; every other sampler returns the
piecewise-constant extension u = (t + v)/T, t ~ probs, v ~ U(0, 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from ddpm_bs import fields, schedules

MAX_TIMESTEPS = 2**31 - 1  # indices are int32
_MASS_TOL = 1e-6
_ONE_MINUS_ULP = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # 1 − 2⁻²⁴
_TINY = float(np.finfo(np.float32).tiny)
_BETAS: dict[str, Callable[[int], np.ndarray]] = {
    "linear": schedules.linear_betas,
    "cosine": schedules.cosine_betas,
}


# ---------------------------------------------------------------------------------------------
# Argument checks: every message names the argument, the value and what is valid.


def check_num_timesteps(num_timesteps: Any) -> int:
    if not fields.is_int(num_timesteps) or not 1 <= num_timesteps <= MAX_TIMESTEPS:
        raise fields.InvalidArgument(
            "num_timesteps",
            f"num_timesteps must be an integer in [1, {MAX_TIMESTEPS}], got {num_timesteps!r}.",
        )
    return int(num_timesteps)


def check_real(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
) -> float:
    """Returns `value` as a float if it is a finite real in [low, high] ((low, high] if low_open)."""
    ok = fields.is_real(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high == math.inf else "]"
        raise fields.InvalidArgument(
            name,
            f"{name} must be a finite real number in {left}{low}, {high}{right}, got {value!r}.",
        )
    return float(value)


def check_schedule(schedule: Any) -> str:
    if not isinstance(schedule, str) or schedule not in _BETAS:
        raise fields.InvalidArgument(
            "schedule", f"schedule must be one of {', '.join(_BETAS)}, got {schedule!r}."
        )
    return schedule


def check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(fields.is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}.")
    return tuple(int(d) for d in shape)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def alphas_cumprod64(schedule: str, num_timesteps: int) -> np.ndarray:
    """ᾱ_t of a named VP schedule in float64, [T] (0-based t)."""
    return np.cumprod(1.0 - _BETAS[schedule](num_timesteps))


# ---------------------------------------------------------------------------------------------
# Drawing: inverse CDF of one uniform number per draw.


def inverse_cdf(cdf: jax.Array, u: jax.Array) -> jax.Array:
    """The first index whose cumulative probability exceeds u: int32, the shape of u.

    `cdf` [T] is non-decreasing with cdf[-1] = 1, so an index of probability 0 (equal
    neighbours) is never returned, and u ∈ [0, 1) never runs past the end.
    """
    index = jnp.searchsorted(cdf, u, side="right", method="scan_unrolled")
    return jnp.minimum(index, cdf.shape[0] - 1).astype(jnp.int32)


def _cdf32(probs: np.ndarray) -> np.ndarray:
    """float32 cumulative sum of `probs`, exactly 1 from the last index of positive mass on."""
    cdf = np.cumsum(probs).astype(np.float32)
    cdf[np.flatnonzero(probs > 0)[-1] :] = 1.0
    return cdf


def _clip_open(u: jax.Array) -> jax.Array:
    return jnp.clip(u, np.float32(_TINY), np.float32(_ONE_MINUS_ULP))


def spread(t: jax.Array, key: jax.Array, num_timesteps: int) -> jax.Array:
    """Piecewise-constant extension of a discrete draw: u = (t + v)/T, v ~ U(0, 1), in (0, 1)."""
    v = jax.random.uniform(key, t.shape, jnp.float32)
    return _clip_open((t.astype(jnp.float32) + v) * np.float32(1.0 / num_timesteps))


# ---------------------------------------------------------------------------------------------
# Samplers.


class Sampler:
    """Shared behaviour. Subclasses are frozen dataclasses with a `num_timesteps` and `_pmf`."""

    stateful: ClassVar[bool] = False
    num_timesteps: int

    def _pmf(self) -> np.ndarray:
        raise NotImplementedError

    @functools.cached_property
    def probs(self) -> np.ndarray:
        """The pmf of the draws: float64 numpy [T], non-negative, summing to 1 (read-only)."""
        return _frozen(np.asarray(self._pmf(), dtype=np.float64))

    @functools.cached_property
    def _cdf(self) -> np.ndarray:
        return _frozen(_cdf32(self.probs))

    @functools.cached_property
    def _inverse_weights(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return _frozen(1.0 / (self.num_timesteps * self.probs))

    def __call__(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Draws timestep indices.

        Args:
          key: a PRNG key (`jax.random.key` or `jax.random.PRNGKey`).
          shape: output shape, a tuple of ints, e.g. `(batch,)`.

        Returns:
          int32 array of `shape` in [0, T), distributed as `probs`.
        """
        return jitted_draw(self, "_draw", key, check_shape(shape))

    def continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Continuous time u ∈ (0, 1): float32 of `shape`.

        Unless the sampler says otherwise, this is the piecewise-constant extension of `probs`:
        u = (t + v)/T with t ~ probs and v ~ U(0, 1), so u·T falls in [t, t+1) with probability
        probs[t] and is uniform inside.
        """
        return jitted_draw(self, "_continuous", key, check_shape(shape))

    def _draw(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return inverse_cdf(jnp.asarray(self._cdf), jax.random.uniform(key, shape, jnp.float32))

    def _continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        key_t, key_v = jax.random.split(key)
        return spread(self._draw(key_t, shape), key_v, self.num_timesteps)


@dataclasses.dataclass(frozen=True)
class Uniform(Sampler):
    """DDPM's uniform timestep law, probs[t] = 1/T; see `uniform`."""

    num_timesteps: int

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", check_num_timesteps(self.num_timesteps))

    def _pmf(self):
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)


@dataclasses.dataclass(frozen=True)
class Bernoulli(Sampler):
    """DDPM-BS's Bernoulli sampler, the paper's Algorithm 1; see `bernoulli`."""

    num_timesteps: int
    t_delta: int
    p: float

    def __post_init__(self):
        num_timesteps = check_num_timesteps(self.num_timesteps)
        if not fields.is_int(self.t_delta) or not 1 <= self.t_delta <= num_timesteps:
            raise fields.InvalidArgument(
                "t_delta",
                f"t_delta must be an integer in [1, num_timesteps={num_timesteps}],"
                f" got {self.t_delta!r}.",
            )
        object.__setattr__(self, "num_timesteps", num_timesteps)
        object.__setattr__(self, "t_delta", int(self.t_delta))
        object.__setattr__(self, "p", check_real("p", self.p, 0.0, 1.0))

    def _pmf(self):
        """p·U{1..t_δ} + (1 − p)·U{t_δ..T} in 1-based t (entry k−1 is t = k)."""
        t = np.arange(1, self.num_timesteps + 1)
        significant = (t <= self.t_delta) / self.t_delta
        rest = (t >= self.t_delta) / (self.num_timesteps - self.t_delta + 1)
        return self.p * significant + (1.0 - self.p) * rest

    def _draw(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Algorithm 1, with the branch's own uniform number reused inside the branch."""
        total, t_delta, p = self.num_timesteps, self.t_delta, np.float32(self.p)
        u = jax.random.uniform(key, shape, jnp.float32)  # u ~ U[0, 1)
        significant = u < p  # with probability p: the significant interval
        # Given the branch, u/p resp. (u − p)/(1 − p) is again U[0, 1): the index inside it.
        v = jnp.where(significant, u / p, (u - p) / (1 - p))
        first = v * t_delta  # 1-based t ~ U{1..t_δ}: 0-based [0, t_δ − 1]
        second = (t_delta - 1) + v * (total - t_delta + 1)  # U{t_δ..T}: 0-based [t_δ − 1, T − 1]
        t = jnp.floor(jnp.where(significant, first, second)).astype(jnp.int32)
        last = jnp.where(significant, t_delta - 1, total - 1)  # float rounding of u/p ≈ 1
        return jnp.minimum(t, last)


@dataclasses.dataclass(frozen=True)
class Piecewise(Sampler):
    """K uniform pieces on shared-boundary intervals; see `piecewise`."""

    num_timesteps: int
    boundaries: tuple[int, ...]
    masses: tuple[float, ...]

    def __post_init__(self):
        num_timesteps = check_num_timesteps(self.num_timesteps)
        boundaries, masses = self.boundaries, self.masses
        if not isinstance(boundaries, (tuple, list)) or not all(
            fields.is_int(b) and 1 <= b <= num_timesteps for b in boundaries
        ):
            raise fields.InvalidArgument(
                "boundaries",
                f"boundaries must be a tuple of integers in [1, num_timesteps={num_timesteps}],"
                f" got {boundaries!r}.",
            )
        boundaries = tuple(int(b) for b in boundaries)
        if any(b1 > b2 for b1, b2 in zip(boundaries[:-1], boundaries[1:], strict=True)):
            raise fields.InvalidArgument(
                "boundaries", f"boundaries must be sorted (non-decreasing), got {boundaries!r}."
            )
        if not isinstance(masses, (tuple, list)) or len(masses) != len(boundaries) + 1:
            raise fields.InvalidArgument(
                "masses",
                f"masses must be a tuple of len(boundaries) + 1 = {len(boundaries) + 1} numbers,"
                f" got {masses!r}.",
            )
        if not all(fields.is_real(m) and m >= 0 for m in masses):
            raise fields.InvalidArgument(
                "masses", f"masses must be finite and non-negative, got {masses!r}."
            )
        masses = tuple(float(m) for m in masses)
        if abs(math.fsum(masses) - 1.0) > _MASS_TOL:
            raise fields.InvalidArgument(
                "masses",
                f"masses must sum to 1 (within {_MASS_TOL:g}), got sum {math.fsum(masses)!r}"
                f" for masses {masses!r}.",
            )
        object.__setattr__(self, "num_timesteps", num_timesteps)
        object.__setattr__(self, "boundaries", boundaries)
        object.__setattr__(self, "masses", masses)

    def _pmf(self):
        # 1-based intervals {b_{k−1}..b_k} with b_0 = 1, b_K = T: 0-based b_{k−1}−1..b_k−1.
        edges = (1, *self.boundaries, self.num_timesteps)
        pmf = np.zeros(self.num_timesteps)
        for first, last, mass in zip(edges[:-1], edges[1:], self.masses, strict=True):
            pmf[first - 1 : last] += (mass / math.fsum(self.masses)) / (last - first + 1)
        return pmf


@dataclasses.dataclass(frozen=True)
class Categorical(Sampler):
    """An arbitrary pmf on {0..T−1}, T = len(weights); see `categorical`."""

    weights: tuple[float, ...]

    def __post_init__(self):
        weights = self.weights
        if (
            not isinstance(weights, (tuple, list))
            or not 1 <= len(weights) <= MAX_TIMESTEPS
            or not all(fields.is_real(w) and w >= 0 for w in weights)
            or math.fsum(weights) <= 0
        ):
            raise fields.InvalidArgument(
                "weights",
                "weights must be a non-empty tuple of finite non-negative numbers with a positive"
                f" sum, got {weights!r}.",
            )
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))

    @property
    def num_timesteps(self) -> int:
        return len(self.weights)

    def _pmf(self):
        weights = np.asarray(self.weights, dtype=np.float64)
        return weights / weights.sum()


@dataclasses.dataclass(frozen=True)
class Beta(Sampler):
    """Discretized Beta(a, b) law; see `beta`. `continuous` draws the Beta law itself."""

    num_timesteps: int
    a: float
    b: float

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", check_num_timesteps(self.num_timesteps))
        object.__setattr__(self, "a", check_real("a", self.a, 0.0, low_open=True))
        object.__setattr__(self, "b", check_real("b", self.b, 0.0, low_open=True))

    def _pmf(self):
        grid = np.arange(self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps
        pmf = np.diff(scipy.special.betainc(self.a, self.b, grid))
        return pmf / pmf.sum()

    def continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """u ~ Beta(a, b) exactly (`jax.random.beta`), clipped into (0, 1) in float32."""
        return super().continuous(key, shape)

    def _continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return _clip_open(jax.random.beta(key, self.a, self.b, shape, jnp.float32))


@dataclasses.dataclass(frozen=True)
class LogNormal(Sampler):
    """EDM's log-normal σ law on the grid of a VP schedule; see `lognormal`."""

    num_timesteps: int
    p_mean: float = -1.2
    p_std: float = 1.2
    schedule: str = "cosine"

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", check_num_timesteps(self.num_timesteps))
        object.__setattr__(self, "p_mean", check_real("p_mean", self.p_mean))
        object.__setattr__(self, "p_std", check_real("p_std", self.p_std, 0.0, low_open=True))
        check_schedule(self.schedule)

    @property
    def sigmas(self) -> np.ndarray:
        """VE noise levels σ_t = √((1−ᾱ_t)/ᾱ_t) of the schedule, float64 [T], increasing."""
        alphas_cumprod = alphas_cumprod64(self.schedule, self.num_timesteps)
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)

    def _pmf(self):
        log_sigmas = np.log(self.sigmas)
        edges = 0.5 * (log_sigmas[:-1] + log_sigmas[1:])  # log-space midpoints, [T−1]
        cdf = scipy.special.ndtr((edges - self.p_mean) / self.p_std)
        pmf = np.diff(np.concatenate([[0.0], cdf, [1.0]]))  # first bin from σ=0, last to ∞
        return pmf / pmf.sum()


@dataclasses.dataclass(frozen=True)
class LogitNormal(Sampler):
    """SD3's logit-normal law on the grid; see `logit_normal`. `continuous` is exact."""

    num_timesteps: int
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", check_num_timesteps(self.num_timesteps))
        object.__setattr__(self, "mean", check_real("mean", self.mean))
        object.__setattr__(self, "std", check_real("std", self.std, 0.0, low_open=True))

    def _pmf(self):
        grid = np.arange(self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps
        with np.errstate(divide="ignore"):
            logits = scipy.special.logit(grid)  # −∞ and +∞ at the ends
        pmf = np.diff(scipy.special.ndtr((logits - self.mean) / self.std))
        return pmf / pmf.sum()

    def continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """u = sigmoid(mean + std·z), z ~ N(0, 1), clipped into (0, 1) in float32."""
        return super().continuous(key, shape)

    def _continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        z = jax.random.normal(key, shape, jnp.float32)
        return _clip_open(jax.nn.sigmoid(np.float32(self.mean) + np.float32(self.std) * z))


# Entry points are jitted on (sampler, method, shape): an eager call compiles one program
# instead of dispatching each small op; under an outer jit/vmap they simply inline.


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def jitted_draw(sampler, method: str, key, shape: tuple[int, ...], *args):
    return getattr(sampler, method)(key, shape, *args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def jitted(sampler, method: str, *args):
    return getattr(sampler, method)(*args)


# ---------------------------------------------------------------------------------------------
# Factories.


def uniform(num_timesteps: int) -> Uniform:
    """DDPM's uniform law: t ~ U{0..T−1} (Ho et al. 2020, Algorithm 1).

    Args:
      num_timesteps: T ≥ 1.
    """
    return Uniform(num_timesteps)


def bernoulli(num_timesteps: int, t_delta: int, p: float) -> Bernoulli:
    """DDPM-BS's Bernoulli timestep sampler (the paper's Algorithm 1; the law B_U(0, T) of Eq. 9).

    Algorithm 1 draws u ~ U[0, 1); if u < p the 1-based timestep is t ~ U{1..t_δ}, the
    significant interval, otherwise t ~ U{t_δ..T}: the two intervals share t_δ. The draw is
    written as that algorithm, reusing u inside the branch (u/p, resp. (u − p)/(1 − p), is
    again uniform given the branch), so one random number makes one timestep and the index
    grows with u (the inverse CDF of the mixture; see the module docstring on coupling).

    In 0-based indices the pmf is p/t_δ below t_δ−1, (1−p)/(T−t_δ+1) above it, and the sum
    of the two at t_δ−1. When p = t_δ/T this is the uniform law but for t_δ itself, which
    both intervals contain: the paper's setting p = 0.8, t_δ/T = 0.8 (T = 1000) is 1/1000 on
    each t < t_δ, 0.2/201 ≈ 0.995/1000 above it, ≈ 2/1000 at t_δ: total-variation distance
    0.001 from uniform (experiments/REPORT.md measured it training as uniform does). The law
    favours the significant interval only when p > t_δ/T; `timesteps.warnings_for` says so
    for a config, and `p='auto'` in a config picks such a p from the W₂ curve.

    Args:
      num_timesteps: T ≥ 1.
      t_delta: the paper's 1-based t_δ, an integer in [1, T] (1 and T are allowed).
      p: probability of the significant interval {1..t_δ}, in [0, 1].
    """
    return Bernoulli(num_timesteps, t_delta, p)


def piecewise(num_timesteps: int, boundaries: Sequence[int], masses: Sequence[float]) -> Piecewise:
    """A mixture of uniform laws on K intervals that share their boundaries, as Algorithm 1's do.

    With 1-based boundaries 1 = b_0 ≤ b_1 ≤ … ≤ b_{K−1} ≤ b_K = T, interval k is {b_{k−1}..b_k}
    (1-based; 0-based indices b_{k−1}−1..b_k−1); it is chosen with probability masses[k] and
    the timestep is then uniform on it. `piecewise(T, (t_δ,), (p, 1−p))` has the law of
    `bernoulli(T, t_δ, p)`. `continuous` is the piecewise-constant extension.

    Args:
      num_timesteps: T ≥ 1.
      boundaries: the K−1 interior 1-based boundaries, non-decreasing integers in [1, T].
      masses: K non-negative probabilities summing to 1 (within 1e-6).
    """
    return Piecewise(num_timesteps, tuple(boundaries), tuple(masses))


def categorical(weights: Sequence[float]) -> Categorical:
    """An arbitrary pmf on {0..len(weights)−1}, proportional to `weights`.

    `continuous` is the piecewise-constant extension.

    Args:
      weights: T ≥ 1 finite non-negative numbers with a positive sum (normalized here).
    """
    return Categorical(tuple(weights))


def beta(num_timesteps: int, a: float, b: float) -> Beta:
    """A discretized Beta(a, b) law: probs[t] = I_{(t+1)/T}(a, b) − I_{t/T}(a, b).

    I is the regularized incomplete beta function (the Beta CDF). a = b = 1 is uniform; a < b
    favours small t (low noise). `continuous` samples Beta(a, b) itself.

    Args:
      num_timesteps: T ≥ 1.
      a: first shape parameter, > 0.
      b: second shape parameter, > 0.
    """
    return Beta(num_timesteps, a, b)


def lognormal(
    num_timesteps: int, p_mean: float = -1.2, p_std: float = 1.2, schedule: str = "cosine"
) -> LogNormal:
    """EDM's training law ln σ ~ N(p_mean, p_std²) (Karras et al. 2022, §5) on a discrete grid.

    The grid's noise levels are the VE sigmas σ_t = √((1−ᾱ_t)/ᾱ_t) of the VP schedule (ᾱ in
    float64 from `schedules.linear_betas` / `schedules.cosine_betas`). Index t owns the σ-bin
    between the log-space midpoints of its neighbours (the first bin starts at σ = 0, the last
    runs to ∞), and gets the normal mass of ln σ in it. `continuous` is the piecewise-constant
    extension of this pmf (not a continuous σ law).

    Args:
      num_timesteps: T ≥ 1.
      p_mean: mean of ln σ (EDM: −1.2).
      p_std: standard deviation of ln σ, > 0 (EDM: 1.2).
      schedule: 'linear' or 'cosine'.
    """
    return LogNormal(num_timesteps, p_mean, p_std, schedule)


def logit_normal(num_timesteps: int, mean: float = 0.0, std: float = 1.0) -> LogitNormal:
    """SD3's logit-normal law u = sigmoid(N(mean, std²)) (Esser et al. 2024, §3.1) on the grid.

    probs[t] = Φ((logit((t+1)/T) − mean)/std) − Φ((logit(t/T) − mean)/std). `continuous`
    samples the continuous logit-normal law itself.

    Args:
      num_timesteps: T ≥ 1.
      mean: location of the logit, m.
      std: scale of the logit, s > 0.
    """
    return LogitNormal(num_timesteps, mean, std)


def importance_weights(sampler: Sampler, t: jax.Array, state: Any = None) -> jax.Array:
    """Weights 1/(T·probs[t]) that make a loss averaged over t ~ probs unbiased for the uniform law.

    E_{t~probs}[w(t)·f(t)] = (1/T)·Σ_t f(t): multiply per-example losses by these to train on
    the DDPM objective while drawing t from `sampler` (off by default: DDPM-BS's Eq. 9 trains
    on the sampler's own law, unweighted). Indices of probability 0 get +inf (never drawn).

    Args:
      sampler: any sampler of this module.
      t: int [...] timestep indices in [0, T).
      state: the `LossAwareState`, required for `loss_aware` and not accepted otherwise.

    Returns:
      float32 [...] weights.
    """
    if sampler.stateful:
        if state is None:
            raise ValueError("state is required for a loss_aware sampler, got None.")
        probs = sampler.probs_from_state(state)
        return 1.0 / (sampler.num_timesteps * probs[jnp.asarray(t)])
    if state is not None:
        raise ValueError(
            f"state is only used by loss_aware samplers, got a state for {type(sampler).__name__}."
        )
    return jnp.asarray(sampler._inverse_weights, jnp.float32)[jnp.asarray(t)]


def tv_to_uniform(sampler: Sampler) -> float:
    """Total-variation distance ½·Σ_t |probs[t] − 1/T| of the sampler's law from uniform, in [0, 1).

    For `loss_aware` it is that of the warm-up law (0). It is the largest difference in the
    probability any set of timesteps gets, e.g. the mass moved onto the significant interval.
    """
    return float(0.5 * np.abs(sampler.probs - 1.0 / sampler.num_timesteps).sum())
