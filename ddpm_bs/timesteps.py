"""Timestep samplers: which diffusion step each training example is trained on.

DDPM-BS (the paper's Algorithm 1 and Eq. 9) replaces the uniform timestep law of DDPM with a
Bernoulli mixture of two uniform laws that puts mass p on the significant interval
{1..t_δ}. This module holds that sampler and the other laws users reach for, all with one
interface:

    sampler = timesteps.bernoulli(num_timesteps=1000, t_delta=800, p=0.8)
    t = sampler(key, (batch,))        # int32 [batch] in [0, T); pure, jit/vmap/shard friendly
    sampler.probs                     # float64 numpy [T], the exact pmf of the draws
    u = sampler.continuous(key, (batch,))   # float32 in (0, 1), for continuous-time training

Timestep indices are 0-based, t ∈ {0..T−1}, t = 0 the least noisy; the paper's 1-based t_k is
index k−1.

Note: when p = t_δ/T the mixture is the uniform law but for t_δ itself, which both intervals
contain (T = 1000, t_δ = 800, p = 0.8: 1/1000 on each t < t_δ, 0.2/201 ≈ 0.995/1000 above it,
≈ 2/1000 at t_δ). The paper's default setting is that one; experiments/REPORT.md measures it.

Every sampler is a frozen dataclass holding only scalars and tuples, so it is hashable, can be
a static argument of `jax.jit`, and carries no hidden state. Derived tables (the pmf, alias
tables) are computed once in float64 numpy and cached on the instance; equality and hashing
use the parameters only. The one stateful sampler, `loss_aware`, keeps its state in an explicit
`LossAwareState` pytree that the training step threads through (and the checkpoint stores).

Exactness. Discrete draws take ONE 32-bit random word per sample and turn it into an index with
exact integer arithmetic (uint32 only, no 64-bit types needed):
  * piecewise-uniform laws (`uniform`, `bernoulli`, `piecewise`) invert the mixture's CDF: the
    word picks the piece by comparison with integer thresholds round(2³²·C_k), and the index
    inside the piece as ⌊r·n_k/W_k⌋, computed exactly with a 64-bit fixed-point reciprocal;
  * any other pmf (`beta`, `lognormal`, `logit_normal`, `categorical`) uses a Walker/Vose alias
    table: the high part of word·T picks a column, the low part decides column vs alias.
Either way each index's probability is a whole number of words over 2³² and differs from
`probs` by a few ×2⁻³² in absolute terms (the resolution of a 32-bit word; float rounding).
`loss_aware` inverts a float32 CDF of its state-dependent pmf (float32 rounding). A draw of
`bernoulli` costs about what a `uniform` draw costs (bench/timesteps.py); a literal Algorithm 1
with three random draws per sample costs about 3.5×.

Continuous time (`continuous`, float32 u ∈ (0, 1), u small = little noise): `beta` and
`logit_normal` sample their continuous laws exactly; every other sampler returns the
piecewise-constant extension u = (t + v)/T, t ~ probs, v ~ U(0, 1).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from ddpm_bs import schedules

SAMPLERS = (
    "uniform",
    "bernoulli",
    "piecewise",
    "beta",
    "lognormal",
    "logit_normal",
    "loss_aware",
)

# Each sampler's `get_sampler` arguments → the `timesteps.*` config fields that hold them
# (configs/default.py); 'lognormal' also takes the schedule, from diffusion.schedule.
CONFIG_FIELDS = {
    "uniform": {},
    "bernoulli": {"t_delta": "t_delta", "p": "p"},
    "piecewise": {"boundaries": "boundaries", "masses": "masses"},
    "beta": {"a": "beta_a", "b": "beta_b"},
    "lognormal": {"p_mean": "p_mean", "p_std": "p_std"},
    "logit_normal": {"mean": "logit_mean", "std": "logit_std"},
    "loss_aware": {"history_per_term": "history", "uniform_prob": "uniform_prob"},
}

_TWO32 = 1 << 32
_MASK32 = _TWO32 - 1
_MAX_TIMESTEPS = 2**31 - 1  # indices are int32
_MASS_TOL = 1e-6
_MAX_UNROLLED_PIECES = 8  # above this many pieces, select the piece with searchsorted
_ONE_MINUS_ULP = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # 1 − 2⁻²⁴
_TINY = float(np.finfo(np.float32).tiny)
_BETAS: dict[str, Callable[[int], np.ndarray]] = {
    "linear": schedules.linear_betas,
    "cosine": schedules.cosine_betas,
}


# ---------------------------------------------------------------------------------------------
# Argument checks: every message names the argument, the value and what is valid.


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


def _check_num_timesteps(num_timesteps: Any) -> int:
    if not _is_int(num_timesteps) or not 1 <= num_timesteps <= _MAX_TIMESTEPS:
        raise ValueError(
            f"num_timesteps must be an integer in [1, {_MAX_TIMESTEPS}], got {num_timesteps!r}."
        )
    return int(num_timesteps)


def _check_real(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
) -> float:
    """Returns `value` as a float if it is a finite real in [low, high] ((low, high] if low_open)."""
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high == math.inf else "]"
        raise ValueError(
            f"{name} must be a finite real number in {left}{low}, {high}{right}, got {value!r}."
        )
    return float(value)


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}.")
    return tuple(int(d) for d in shape)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# ---------------------------------------------------------------------------------------------
# Exact uint32 arithmetic.


def _u32(c: int) -> np.uint32:
    return np.uint32(c)


def _mulhi(a: jax.Array, b: jax.Array | int) -> jax.Array:
    """⌊a·b / 2³²⌋ for uint32 `a` and uint32 `b` (an array or a Python int), in uint32 only.

    Schoolbook multiplication in 16-bit halves (Hacker's Delight, §8-2); no partial sum
    overflows. A constant `b` below 2¹⁶ takes a three-multiply shortcut.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    if isinstance(b, int):
        b_lo, b_hi = _u32(b & 0xFFFF), _u32(b >> 16)
        if b >> 16 == 0:
            return (a_hi * b_lo + ((a_lo * b_lo) >> 16)) >> 16
    else:
        b_lo, b_hi = b & 0xFFFF, b >> 16
    t = a_hi * b_lo + ((a_lo * b_lo) >> 16)
    w = (t & 0xFFFF) + a_lo * b_hi
    return a_hi * b_hi + (t >> 16) + (w >> 16)


def _mul_fixed(r: jax.Array, hi: jax.Array | int, lo: jax.Array | int) -> jax.Array:
    """⌊r·F / 2⁶⁴⌋ for uint32 r and the 64-bit constant F = hi·2³² + lo, in uint32 only."""
    top = _mulhi(r, hi)
    if isinstance(lo, int) and lo == 0:
        return top
    mid = r * (_u32(hi) if isinstance(hi, int) else hi)  # low word of r·hi (wraps mod 2³²)
    s = mid + _mulhi(r, lo)
    return top + (s < mid).astype(jnp.uint32)  # carry into the top word


def _open_unit(bits: jax.Array) -> jax.Array:
    """float32 in [2⁻²⁴, 1 − 2⁻²⁴] from uint32 bits: (k + ½)·2⁻²³ for the top 23 bits k."""
    return ((bits >> 9).astype(jnp.float32) + 0.5) * np.float32(2.0**-23)


def _half_open_unit(bits: jax.Array) -> jax.Array:
    """float32 in [0, 1 − 2⁻²⁴] from uint32 bits: k·2⁻²⁴ for the top 24 bits k."""
    return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def _clip_open(u: jax.Array) -> jax.Array:
    return jnp.clip(u, np.float32(_TINY), np.float32(_ONE_MINUS_ULP))


def _spread(t: jax.Array, key: jax.Array, num_timesteps: int) -> jax.Array:
    """Piecewise-constant extension of a discrete draw: u = (t + v)/T, v ~ U(0, 1), in (0, 1)."""
    v = _open_unit(jax.random.bits(key, t.shape, jnp.uint32))
    u = (t.astype(jnp.float32) + v) * np.float32(1.0 / num_timesteps)
    return jnp.minimum(u, np.float32(_ONE_MINUS_ULP))


# ---------------------------------------------------------------------------------------------
# Table builders (float64 numpy / exact Python integers, at construction).


class _Piece(NamedTuple):
    offset: int  # first 32-bit word of the piece: round(2³²·C_{k−1})
    start: int  # first 0-based index of the piece
    hi: int  # ⌈n·2⁶⁴/W⌉ = hi·2³² + lo, with W the piece's count of words
    lo: int


def _piece_table(
    starts: Sequence[int], lengths: Sequence[int], masses: Sequence[float]
) -> tuple[_Piece, ...]:
    """Integer tables that map a uniform 32-bit word to a draw from a mixture of uniform pieces.

    Piece k owns the W_k = P_k − P_{k−1} words in [P_{k−1}, P_k), P_k = round(2³²·C_k) with C
    the cumulative (normalized) masses; word x in it maps to index start_k + ⌊r·n_k/W_k⌋,
    r = x − P_{k−1}. With F = ⌈n·2⁶⁴/W⌉, ⌊r·F/2⁶⁴⌋ equals ⌊r·n/W⌋ exactly for all r < W ≤ 2³²
    (the excess r·(F − n·2⁶⁴/W)/2⁶⁴ < 2⁻³² never reaches the next multiple of 1/W). So each
    index of piece k is hit by ⌊W_k/n_k⌋ or ⌈W_k/n_k⌉ words. Pieces that own no word (zero or
    sub-2⁻³² mass) are dropped.
    """
    cum = np.cumsum(np.asarray(masses, dtype=np.float64))
    cum = cum / cum[-1]
    edges = [0] + [min(int(round(c * _TWO32)), _TWO32) for c in cum[:-1]] + [_TWO32]
    pieces = []
    for k, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        width = edges[k + 1] - edges[k]
        if width <= 0:
            continue
        f = -(-(n << 64) // width)  # ceil
        hi, lo = f >> 32, f & _MASK32
        if hi > _MASK32:  # W < n: a piece of mass below n·2⁻³²; clamp (its words stay inside)
            hi, lo = _MASK32, _MASK32
        pieces.append(_Piece(edges[k], int(start), hi, lo))
    return tuple(pieces)


def _draw_pieces(pieces: tuple[_Piece, ...], bits: jax.Array) -> jax.Array:
    """Inverse CDF of a mixture of uniform pieces for uint32 words `bits`. int32, same shape."""
    if len(pieces) == 1:
        (piece,) = pieces
        local = _mul_fixed(bits, piece.hi, piece.lo)
        return (local + _u32(piece.start)).astype(jnp.int32)
    if len(pieces) <= _MAX_UNROLLED_PIECES:
        first = pieces[0]
        offset, start = _u32(0), _u32(first.start)
        hi, lo = _u32(first.hi), _u32(first.lo)
        for piece in pieces[1:]:  # offsets increase, so the last piece reached wins
            inside = bits >= _u32(piece.offset)
            offset = jnp.where(inside, _u32(piece.offset), offset)
            start = jnp.where(inside, _u32(piece.start), start)
            hi = jnp.where(inside, _u32(piece.hi), hi)
            lo = jnp.where(inside, _u32(piece.lo), lo)
    else:
        table = np.asarray(pieces, dtype=np.uint64).astype(np.uint32)  # [K, 4]
        k = jnp.searchsorted(table[1:, 0], bits, side="right")
        offset, start, hi, lo = (jnp.asarray(table[:, c])[k] for c in range(4))
    local = _mul_fixed(bits - offset, hi, lo)
    return (local + start).astype(jnp.int32)


def _piecewise_pmf(
    num_timesteps: int, starts: Sequence[int], lengths: Sequence[int], masses: Sequence[float]
) -> np.ndarray:
    total = math.fsum(masses)
    pmf = np.zeros(num_timesteps, dtype=np.float64)
    for start, n, mass in zip(starts, lengths, masses, strict=True):
        pmf[start : start + n] += (mass / total) / n
    return pmf


def _alias_table(pmf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table for `pmf` [T]: (keep thresholds uint32 [T], alias int32 [T]).

    Column j is drawn with probability 1/T; it keeps j when a uniform 32-bit word is below
    threshold[j] and gives alias[j] otherwise. Built in float64; leftover columns (float
    residue) keep themselves.
    """
    num = pmf.size
    scaled = pmf * num
    keep = np.ones(num, dtype=np.float64)
    alias = np.arange(num, dtype=np.int32)
    small = [i for i in range(num) if scaled[i] < 1.0]
    large = [i for i in range(num) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        keep[s], alias[s] = scaled[s], g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        (small if scaled[g] < 1.0 else large).append(g)
    threshold = np.minimum(np.round(keep * _TWO32), _MASK32).astype(np.uint32)
    alias[threshold == _MASK32] = np.flatnonzero(threshold == _MASK32)
    return threshold, alias


def _draw_alias(threshold: np.ndarray, alias: np.ndarray, bits: jax.Array) -> jax.Array:
    """One 32-bit word per draw: column ⌊x·T/2³²⌋, then keep it iff (x·T mod 2³²) < threshold.

    For the words of one column, x·T mod 2³² runs through an arithmetic progression of step T
    over [0, 2³²), so the keep probability is threshold/2³² up to one word in 2³²/T.
    """
    num = threshold.size
    column = _mulhi(bits, num)
    fraction = bits * _u32(num)
    index = column.astype(jnp.int32)
    kept = fraction < jnp.asarray(threshold).at[index].get(mode="promise_in_bounds")
    return jnp.where(kept, index, jnp.asarray(alias).at[index].get(mode="promise_in_bounds"))


# ---------------------------------------------------------------------------------------------
# Samplers.


class _Sampler:
    """Shared behaviour. Subclasses are frozen dataclasses with a `num_timesteps` and `_pmf`."""

    stateful: ClassVar[bool] = False
    num_timesteps: int

    def _pmf(self) -> np.ndarray:
        raise NotImplementedError

    def _draw(self, bits: jax.Array) -> jax.Array:
        raise NotImplementedError

    @functools.cached_property
    def probs(self) -> np.ndarray:
        """The pmf of the draws: float64 numpy [T], non-negative, summing to 1 (read-only)."""
        return _frozen(np.asarray(self._pmf(), dtype=np.float64))

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
        return _jitted_draw(self, key, _check_shape(shape))

    def continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Continuous time u ∈ (0, 1): float32 of `shape`.

        Unless the sampler says otherwise, this is the piecewise-constant extension of `probs`:
        u = (t + v)/T with t ~ probs and v ~ U(0, 1), so u·T falls in [t, t+1) with probability
        probs[t] and is uniform inside.
        """
        return _jitted_continuous(self, key, _check_shape(shape))

    def _continuous(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        key_t, key_v = jax.random.split(key)
        t = self._draw(jax.random.bits(key_t, shape, jnp.uint32))
        return _spread(t, key_v, self.num_timesteps)


class _PiecewiseSampler(_Sampler):
    """A mixture of uniform laws on index intervals, drawn by exact inverse CDF."""

    def _pieces(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
        """(0-based starts, lengths, masses) of the pieces."""
        raise NotImplementedError

    def _pmf(self) -> np.ndarray:
        return _piecewise_pmf(self.num_timesteps, *self._pieces())

    @functools.cached_property
    def _table(self) -> tuple[_Piece, ...]:
        return _piece_table(*self._pieces())

    def _draw(self, bits: jax.Array) -> jax.Array:
        return _draw_pieces(self._table, bits)


class _AliasSampler(_Sampler):
    """A general pmf on the grid, drawn in O(1) with a Walker/Vose alias table."""

    @functools.cached_property
    def _alias(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(_frozen(a) for a in _alias_table(self.probs))

    def _draw(self, bits: jax.Array) -> jax.Array:
        return _draw_alias(*self._alias, bits)


@dataclasses.dataclass(frozen=True)
class Uniform(_PiecewiseSampler):
    """DDPM's uniform timestep law, probs[t] = 1/T. `continuous` is exactly U(0, 1)."""

    num_timesteps: int

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", _check_num_timesteps(self.num_timesteps))

    def _pieces(self):
        return (0,), (self.num_timesteps,), (1.0,)


@dataclasses.dataclass(frozen=True)
class Piecewise(_PiecewiseSampler):
    """K uniform pieces on shared-boundary intervals; see `piecewise`."""

    num_timesteps: int
    boundaries: tuple[int, ...]
    masses: tuple[float, ...]

    def __post_init__(self):
        num_timesteps = _check_num_timesteps(self.num_timesteps)
        boundaries, masses = self.boundaries, self.masses
        if not isinstance(boundaries, (tuple, list)) or not all(
            _is_int(b) and 1 <= b <= num_timesteps for b in boundaries
        ):
            raise ValueError(
                f"boundaries must be a tuple of integers in [1, num_timesteps={num_timesteps}],"
                f" got {boundaries!r}."
            )
        boundaries = tuple(int(b) for b in boundaries)
        if any(b1 > b2 for b1, b2 in zip(boundaries[:-1], boundaries[1:], strict=True)):
            raise ValueError(f"boundaries must be sorted (non-decreasing), got {boundaries!r}.")
        if not isinstance(masses, (tuple, list)) or len(masses) != len(boundaries) + 1:
            raise ValueError(
                f"masses must be a tuple of len(boundaries) + 1 = {len(boundaries) + 1} numbers,"
                f" got {masses!r}."
            )
        if not all(_is_real(m) and math.isfinite(m) and m >= 0 for m in masses):
            raise ValueError(f"masses must be finite and non-negative, got {masses!r}.")
        masses = tuple(float(m) for m in masses)
        if abs(math.fsum(masses) - 1.0) > _MASS_TOL:
            raise ValueError(
                f"masses must sum to 1 (within {_MASS_TOL:g}), got sum {math.fsum(masses)!r}"
                f" for masses {masses!r}."
            )
        object.__setattr__(self, "num_timesteps", num_timesteps)
        object.__setattr__(self, "boundaries", boundaries)
        object.__setattr__(self, "masses", masses)

    def _pieces(self):
        # 1-based intervals {b_{k−1}..b_k} with b_0 = 1, b_K = T → 0-based start b_{k−1} − 1.
        edges = (1, *self.boundaries, self.num_timesteps)
        starts = tuple(b - 1 for b in edges[:-1])
        lengths = tuple(b2 - b1 + 1 for b1, b2 in zip(edges[:-1], edges[1:], strict=True))
        return starts, lengths, self.masses


@dataclasses.dataclass(frozen=True)
class Bernoulli(_PiecewiseSampler):
    """DDPM-BS's Bernoulli sampler (Algorithm 1); see `bernoulli`."""

    num_timesteps: int
    t_delta: int
    p: float

    def __post_init__(self):
        num_timesteps = _check_num_timesteps(self.num_timesteps)
        if not _is_int(self.t_delta) or not 1 <= self.t_delta <= num_timesteps:
            raise ValueError(
                f"t_delta must be an integer in [1, num_timesteps={num_timesteps}],"
                f" got {self.t_delta!r}."
            )
        object.__setattr__(self, "num_timesteps", num_timesteps)
        object.__setattr__(self, "t_delta", int(self.t_delta))
        object.__setattr__(self, "p", _check_real("p", self.p, 0.0, 1.0))

    @property
    def as_piecewise(self) -> Piecewise:
        """The same law as `piecewise(T, (t_delta,), (p, 1 − p))`."""
        return Piecewise(self.num_timesteps, (self.t_delta,), (self.p, 1.0 - self.p))

    def _pieces(self):
        return self.as_piecewise._pieces()


@dataclasses.dataclass(frozen=True)
class Categorical(_AliasSampler):
    """An arbitrary pmf on {0..T−1}, T = len(weights); see `categorical`."""

    weights: tuple[float, ...]

    def __post_init__(self):
        weights = self.weights
        if (
            not isinstance(weights, (tuple, list))
            or not 1 <= len(weights) <= _MAX_TIMESTEPS
            or not all(_is_real(w) and math.isfinite(w) and w >= 0 for w in weights)
            or math.fsum(weights) <= 0
        ):
            raise ValueError(
                "weights must be a non-empty tuple of finite non-negative numbers with a positive"
                f" sum, got {weights!r}."
            )
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))

    @property
    def num_timesteps(self) -> int:
        return len(self.weights)

    def _pmf(self):
        weights = np.asarray(self.weights, dtype=np.float64)
        return weights / weights.sum()


@dataclasses.dataclass(frozen=True)
class Beta(_AliasSampler):
    """Discretized Beta(a, b) law; see `beta`. `continuous` draws the Beta law itself."""

    num_timesteps: int
    a: float
    b: float

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", _check_num_timesteps(self.num_timesteps))
        object.__setattr__(self, "a", _check_real("a", self.a, 0.0, low_open=True))
        object.__setattr__(self, "b", _check_real("b", self.b, 0.0, low_open=True))

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
class LogNormal(_AliasSampler):
    """EDM's log-normal σ law on the grid of a VP schedule; see `lognormal`."""

    num_timesteps: int
    p_mean: float = -1.2
    p_std: float = 1.2
    schedule: str = "cosine"

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", _check_num_timesteps(self.num_timesteps))
        object.__setattr__(self, "p_mean", _check_real("p_mean", self.p_mean))
        object.__setattr__(self, "p_std", _check_real("p_std", self.p_std, 0.0, low_open=True))
        if not isinstance(self.schedule, str) or self.schedule not in _BETAS:
            raise ValueError(f"schedule must be one of {', '.join(_BETAS)}, got {self.schedule!r}.")

    @property
    def sigmas(self) -> np.ndarray:
        """VE noise levels σ_t = √((1−ᾱ_t)/ᾱ_t) of the schedule, float64 [T], increasing."""
        alphas_cumprod = np.cumprod(1.0 - _BETAS[self.schedule](self.num_timesteps))
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)

    def _pmf(self):
        log_sigmas = np.log(self.sigmas)
        edges = 0.5 * (log_sigmas[:-1] + log_sigmas[1:])  # log-space midpoints, [T−1]
        cdf = scipy.special.ndtr((edges - self.p_mean) / self.p_std)
        pmf = np.diff(np.concatenate([[0.0], cdf, [1.0]]))  # first bin from σ=0, last to ∞
        return pmf / pmf.sum()


@dataclasses.dataclass(frozen=True)
class LogitNormal(_AliasSampler):
    """SD3's logit-normal law on the grid; see `logit_normal`. `continuous` is exact."""

    num_timesteps: int
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", _check_num_timesteps(self.num_timesteps))
        object.__setattr__(self, "mean", _check_real("mean", self.mean))
        object.__setattr__(self, "std", _check_real("std", self.std, 0.0, low_open=True))

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


class LossAwareState(NamedTuple):
    """State of the `loss_aware` sampler (a pytree; checkpoint it with the train state)."""

    history: jax.Array  # [T, H] float32: the last H losses per timestep, oldest first
    counts: jax.Array  # [T] int32: how many of the H slots of each row hold a loss


@dataclasses.dataclass(frozen=True)
class LossAware(_Sampler):
    """improved-DDPM's loss-second-moment importance sampler; see `loss_aware`.

    Its `probs` is the warm-up (uniform) pmf; draws follow `probs_from_state(state)`.
    """

    stateful: ClassVar[bool] = True

    num_timesteps: int
    history_per_term: int = 10
    uniform_prob: float = 0.001

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", _check_num_timesteps(self.num_timesteps))
        if not _is_int(self.history_per_term) or self.history_per_term < 1:
            raise ValueError(
                f"history_per_term must be an integer ≥ 1, got {self.history_per_term!r}."
            )
        object.__setattr__(self, "history_per_term", int(self.history_per_term))
        object.__setattr__(
            self, "uniform_prob", _check_real("uniform_prob", self.uniform_prob, 0.0, 1.0)
        )

    def _pmf(self):
        """The warm-up pmf (uniform): the draws follow `probs_from_state(state)` instead."""
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def init_state(self) -> LossAwareState:
        """An empty history: draws are uniform until every timestep has H losses."""
        return LossAwareState(
            history=jnp.zeros((self.num_timesteps, self.history_per_term), jnp.float32),
            counts=jnp.zeros((self.num_timesteps,), jnp.int32),
        )

    def probs_from_state(self, state: LossAwareState) -> jax.Array:
        """The current pmf, float32 [T].

        Uniform until every timestep holds `history_per_term` losses; then
        (1 − uniform_prob)·w/Σw + uniform_prob/T with w_t = √(mean over the history of loss²)
        (improved-DDPM §3.3: importance sampling of L_vlb by its second moment).
        """
        return _jitted_method(self, "_probs", state)

    def update(self, state: LossAwareState, t: jax.Array, losses: jax.Array) -> LossAwareState:
        """Appends per-example losses to the histories of their timesteps (pure; jit-friendly).

        Equals improved-diffusion's sequential loop over the batch in array order: a full
        row drops its oldest loss; a timestep repeated within the batch appends each of its
        losses in turn (so if it repeats more than H times only its last H losses stay).

        Args:
          state: the current `LossAwareState`.
          t: int [...] timestep indices in [0, T) (values outside are not checked under jit).
          losses: [...] per-example losses, the same shape as `t` (gradients are stopped).

        Returns:
          The new `LossAwareState`.
        """
        t, losses = jnp.asarray(t), jnp.asarray(losses)
        if t.shape != losses.shape:
            raise ValueError(
                f"losses must have the same shape as t, got losses {losses.shape} and t {t.shape}."
            )
        if t.size == 0:
            return state
        return _jitted_method(self, "_update", state, t, losses)

    def __call__(self, key: jax.Array, shape: tuple[int, ...], state: LossAwareState) -> jax.Array:
        """Draws int32 indices of `shape` from `probs_from_state(state)` (float32 inverse CDF)."""
        return _jitted_draw_method(self, "_draw_from_state", key, _check_shape(shape), state)

    def continuous(
        self, key: jax.Array, shape: tuple[int, ...], state: LossAwareState
    ) -> jax.Array:
        """Piecewise-constant extension of `probs_from_state(state)`: u = (t + v)/T in (0, 1)."""
        return _jitted_draw_method(self, "_continuous_from_state", key, _check_shape(shape), state)

    def _probs(self, state: LossAwareState) -> jax.Array:
        num = self.num_timesteps
        w = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
        total = jnp.sum(w)
        warm = jnp.all(state.counts >= self.history_per_term) & (total > 0)
        mixed = (1.0 - self.uniform_prob) * w / jnp.where(total > 0, total, 1.0)
        mixed = mixed + self.uniform_prob / num
        return jnp.where(warm, mixed, jnp.full((num,), 1.0 / num, jnp.float32))

    def _update(self, state: LossAwareState, t: jax.Array, losses: jax.Array) -> LossAwareState:
        t = t.reshape(-1).astype(jnp.int32)
        losses = jax.lax.stop_gradient(losses).reshape(-1).astype(jnp.float32)
        size, depth = t.shape[0], self.history_per_term
        # Rank of each example among the earlier examples with the same t (stable sort by t).
        order = jnp.argsort(t, stable=True)
        t_sorted = t[order]
        first = jnp.searchsorted(t_sorted, t_sorted, side="left").astype(jnp.int32)
        rank_sorted = jnp.arange(size, dtype=jnp.int32) - first
        rank = jnp.zeros((size,), jnp.int32).at[order].set(rank_sorted)
        added = jnp.zeros((self.num_timesteps,), jnp.int32).at[t].add(1)
        total = state.counts + added  # length of old history + new losses, per row
        shift = jnp.maximum(total - depth, 0)  # how many of the oldest entries fall off
        # Old entries move left by `shift`; slots past the surviving old ones start empty.
        slot = jnp.arange(depth, dtype=jnp.int32)[None, :] + shift[:, None]  # [T, H]
        old = jnp.take_along_axis(state.history, jnp.minimum(slot, depth - 1), axis=1)
        history = jnp.where(slot < state.counts[:, None], old, 0.0)
        # New losses land after the old ones; ones pushed out within this batch are dropped.
        position = state.counts[t] + rank - shift[t]
        position = jnp.where(position >= 0, position, depth)
        history = history.at[t, position].set(losses, mode="drop")
        return LossAwareState(history=history, counts=jnp.minimum(total, depth))

    def _draw_from_state(self, key, shape, state) -> jax.Array:
        cdf = jnp.cumsum(self._probs(state))
        u = _half_open_unit(jax.random.bits(key, shape, jnp.uint32)) * cdf[-1]
        index = jnp.searchsorted(cdf, u, side="right")
        return jnp.minimum(index, self.num_timesteps - 1).astype(jnp.int32)

    def _continuous_from_state(self, key, shape, state) -> jax.Array:
        key_t, key_v = jax.random.split(key)
        return _spread(self._draw_from_state(key_t, shape, state), key_v, self.num_timesteps)


# Sampling entry points are jitted on (sampler, shape): an eager call compiles one program
# instead of dispatching each small op; under an outer jit/vmap they simply inline.


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_draw(sampler: _Sampler, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return sampler._draw(jax.random.bits(key, shape, jnp.uint32))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_continuous(sampler: _Sampler, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return sampler._continuous(key, shape)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _jitted_draw_method(sampler, method: str, key, shape: tuple[int, ...], *args):
    return getattr(sampler, method)(key, shape, *args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_method(sampler, method: str, *args):
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

    Algorithm 1 draws u ~ U[0, 1]; if u < p the 1-based timestep is t ~ U{1..t_δ}, otherwise
    t ~ U{t_δ..T}: the two intervals share t_δ. In 0-based indices the pmf is p/t_δ below
    t_δ−1, (1−p)/(T−t_δ+1) above it, and the sum of the two at t_δ−1. The paper uses
    t_δ/T = 0.8 and p > 0.5 (p < 0.5 trains slower than uniform).

    Both the branch and the index come from one 32-bit word (the inverse CDF of the mixture),
    so a draw costs about what a uniform draw costs. This is `piecewise(T, (t_delta,),
    (p, 1 − p))` (see `as_piecewise`). `continuous` is the piecewise-constant extension.

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
    the timestep is then uniform on it. `piecewise(T, (t_δ,), (p, 1−p))` is DDPM-BS's
    `bernoulli(T, t_δ, p)`. `continuous` is the piecewise-constant extension.

    Args:
      num_timesteps: T ≥ 1.
      boundaries: the K−1 interior 1-based boundaries, non-decreasing integers in [1, T].
      masses: K non-negative probabilities summing to 1 (within 1e-6).
    """
    return Piecewise(num_timesteps, tuple(boundaries), tuple(masses))


def categorical(weights: Sequence[float]) -> Categorical:
    """An arbitrary pmf on {0..len(weights)−1}, proportional to `weights`, drawn with an alias table.

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


def loss_aware(
    num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001
) -> LossAware:
    """improved-DDPM's loss-aware importance sampler (Nichol & Dhariwal 2021, §3.3).

    Keeps the last `history_per_term` losses of every timestep and, once all are full, draws
    t with probability (1 − uniform_prob)·w_t/Σw + uniform_prob/T, w_t = √E[loss_t²] over the
    history (improved-diffusion's LossSecondMomentResampler); uniform before that. The state
    lives in a `LossAwareState` the caller threads through:

        state = sampler.init_state()
        t = sampler(key, (batch,), state)
        state = sampler.update(state, t, per_example_losses)

    `probs` is the warm-up (uniform) pmf; the current one is `probs_from_state(state)`.
    `continuous(key, shape, state)` is the piecewise-constant extension. Pair it with
    `importance_weights(sampler, t, state)` for the unbiased objective improved-DDPM uses.

    Args:
      num_timesteps: T ≥ 1.
      history_per_term: H ≥ 1 losses kept per timestep.
      uniform_prob: mass of the uniform component, in [0, 1].
    """
    return LossAware(num_timesteps, history_per_term, uniform_prob)


def importance_weights(
    sampler: _Sampler, t: jax.Array, state: LossAwareState | None = None
) -> jax.Array:
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


_FACTORIES: dict[str, Callable[..., _Sampler]] = {
    "uniform": uniform,
    "bernoulli": bernoulli,
    "piecewise": piecewise,
    "beta": beta,
    "lognormal": lognormal,
    "logit_normal": logit_normal,
    "loss_aware": loss_aware,
}


def get_sampler(name: str, num_timesteps: int, **kwargs: Any) -> _Sampler:
    """The sampler called `name` (one of `SAMPLERS`), for configs.

    Example: `get_sampler("bernoulli", 1000, t_delta=800, p=0.8)`.

    Args:
      name: one of 'uniform', 'bernoulli', 'piecewise', 'beta', 'lognormal', 'logit_normal',
        'loss_aware'.
      num_timesteps: T ≥ 1.
      **kwargs: the factory's other arguments.
    """
    if not isinstance(name, str) or name not in _FACTORIES:
        raise ValueError(f"sampler name {name!r} is unknown; valid names: {', '.join(SAMPLERS)}.")
    factory = _FACTORIES[name]
    valid = [p for p in inspect.signature(factory).parameters if p != "num_timesteps"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"argument(s) {', '.join(unknown)} unknown for sampler {name!r}; valid arguments:"
            f" {', '.join(valid) or '(none)'}."
        )
    return factory(num_timesteps, **kwargs)
