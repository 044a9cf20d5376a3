"""improved-DDPM's loss-aware timestep sampler: the one law whose pmf depends on training state.

The state is an explicit `LossAwareState` pytree (the last H losses of every timestep) that the
training step threads through and the checkpoint stores; `update` is pure.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import fields
from ddpm_bs.timesteps.laws import (
    Sampler,
    check_num_timesteps,
    check_real,
    check_shape,
    inverse_cdf,
    jitted,
    jitted_draw,
    spread,
)


class LossAwareState(NamedTuple):
    """State of the `loss_aware` sampler (a pytree; checkpoint it with the train state)."""

    history: jax.Array  # [T, H] float32: the last H losses per timestep, oldest first
    counts: jax.Array  # [T] int32: how many of the H slots of each row hold a loss


@dataclasses.dataclass(frozen=True)
class LossAware(Sampler):
    """improved-DDPM's loss-second-moment importance sampler; see `loss_aware`.

    Its `probs` is the warm-up (uniform) pmf; draws follow `probs_from_state(state)`.
    """

    stateful: ClassVar[bool] = True

    num_timesteps: int
    history_per_term: int = 10
    uniform_prob: float = 0.001

    def __post_init__(self):
        object.__setattr__(self, "num_timesteps", check_num_timesteps(self.num_timesteps))
        if not fields.is_int(self.history_per_term) or self.history_per_term < 1:
            raise fields.InvalidArgument(
                "history_per_term",
                f"history_per_term must be an integer ≥ 1, got {self.history_per_term!r}.",
            )
        object.__setattr__(self, "history_per_term", int(self.history_per_term))
        object.__setattr__(
            self, "uniform_prob", check_real("uniform_prob", self.uniform_prob, 0.0, 1.0)
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
        return jitted(self, "_probs", state)

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
        return jitted(self, "_update", state, t, losses)

    def __call__(self, key: jax.Array, shape: tuple[int, ...], state: LossAwareState) -> jax.Array:
        """Draws int32 indices of `shape` from `probs_from_state(state)` (float32 inverse CDF)."""
        return jitted_draw(self, "_draw_from_state", key, check_shape(shape), state)

    def continuous(
        self, key: jax.Array, shape: tuple[int, ...], state: LossAwareState
    ) -> jax.Array:
        """Piecewise-constant extension of `probs_from_state(state)`: u = (t + v)/T in (0, 1)."""
        return jitted_draw(self, "_continuous_from_state", key, check_shape(shape), state)

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
        return inverse_cdf(cdf / cdf[-1], jax.random.uniform(key, shape, jnp.float32))

    def _continuous_from_state(self, key, shape, state) -> jax.Array:
        key_t, key_v = jax.random.split(key)
        return spread(self._draw_from_state(key_t, shape, state), key_v, self.num_timesteps)


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
