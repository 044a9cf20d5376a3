"""Entropic OT between one seed's noised sets at every grid timestep (ott-jax's Sinkhorn).

`solve_seed` solves each pair of `PAIRS` that an estimator needs at every t of a grid, inside
a compiled `lax.scan` over chunks of timesteps, each t warm-started from the previous t's
potentials (with the noise fixed across t, consecutive problems are close).

* Dense mode (``batch_size=None``): with the noise fixed, the cost matrix of a pair is
  C_t = ᾱ_t·‖x_i − y_j‖² + (1−ᾱ_t)·‖ξ_i − η_j‖² + 2√(ᾱ_t(1−ᾱ_t))·⟨x_i − y_j, ξ_i − η_j⟩, so
  three [n, m] matrices, each a float32 GEMM computed once per seed, give C_t at every t for
  O(nm) work: no d-dimensional work inside the loop over t.
* Online mode (``batch_size`` set): the noised sets are formed with `diffusion.q_sample` at each
  t and the cost is recomputed `batch_size` rows at a time inside every Sinkhorn iteration
  (ott's `PointCloud`, with its online kernel replaced: ott-jax 0.6.0's is broken on JAX ≥ 0.9),
  so memory is O((n+m)·d + batch_size·max(n, m)); use it when the [n, m] matrices do not fit.
  Both modes give the same numbers (to float32 rounding).
* ε_t = epsilon_rel × mean(C_t of the pair (A_t, B_t)), shared by all pairs at that t so the
  entropic biases of the terms match. Costs are divided by that mean inside the solver, so the
  potentials carried from t to t are on the same scale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry as ott_geometry
from ott.geometry import pointcloud
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn

from ddpm_bs import diffusion, schedules

# A pair is (x set, y set, x noise, y noise); sets 'a'/'b', noises 'a', 'b', 'a2', 'b2'.
PAIRS = {
    "ab": ("a", "b", "a", "b"),  # the naive Eq. 8 term
    "aa_prime": ("a", "a", "a", "a2"),  # baseline: A_t against A′_t, the same images re-noised
    "bb_prime": ("b", "b", "b", "b2"),
    "aa": ("a", "a", "a", "a"),  # Sinkhorn-divergence self terms OT_ε(A_t, A_t)
    "bb": ("b", "b", "b", "b"),
}
_SYMMETRIC = ("aa", "bb")  # x = y and the same noise: ott's symmetric Sinkhorn updates
_HIGHEST = jax.lax.Precision.HIGHEST  # keep ‖x‖² − 2x·y + ‖y‖² out of TF32 on GPUs


def solve_seed(
    a: jax.Array,
    b: jax.Array,
    noise: Mapping[str, jax.Array],
    t_grid: np.ndarray,
    *,
    pair_names: tuple[str, ...],
    schedule_obj: schedules.Schedule,
    epsilon_rel: float,
    batch_size: int | None,
    solver_options: tuple[float, int, int],
    chunk_size: int,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Every pair of `pair_names` at every grid t for one seed's noise.

    Args:
      a: [n, d] set A, flattened, float32.
      b: [m, d] set B.
      noise: the seed's noise, name → [n or m, d] (`curve.seed_noise`).
      t_grid: [K] increasing 0-based timesteps.
      pair_names: keys of `PAIRS` to solve; 'ab' must be among them (it sets ε_t).
      schedule_obj: the VP schedule (ᾱ_t).
      epsilon_rel: ε_t = epsilon_rel × mean C(A_t, B_t).
      batch_size: None for the dense cost; rows per block of the online cost.
      solver_options: (threshold, max_iterations, inner_iterations) of ott's Sinkhorn.
      chunk_size: timesteps per compiled `lax.scan`.
      on_chunk: called with the number of timesteps each finished chunk solved.

    Returns:
      'epsilon' [K], and 'transport', 'regularized', 'converged', 'iterations': pair → [K];
      numpy.
    """
    sets = {"a": a, "b": b}
    num_chunks = -(-len(t_grid) // chunk_size)
    padded = np.concatenate(
        [t_grid, np.full(num_chunks * chunk_size - len(t_grid), t_grid[-1], t_grid.dtype)]
    ).astype(np.int32)
    if batch_size is None:
        terms = _dense_terms(sets, noise, pair_names)
        run_chunk = functools.partial(_dense_chunk, terms)
    else:
        points = {
            p: (sets[PAIRS[p][0]], sets[PAIRS[p][1]], noise[PAIRS[p][2]], noise[PAIRS[p][3]])
            for p in pair_names
        }
        run_chunk = functools.partial(_online_chunk, points, batch_size=batch_size)
    sizes = {"a": a.shape[0], "b": b.shape[0]}
    carry = {
        p: (
            jnp.zeros((sizes[PAIRS[p][0]],), jnp.float32),
            jnp.zeros((sizes[PAIRS[p][1]],), jnp.float32),
        )
        for p in pair_names
    }
    outputs = []
    for c in range(num_chunks):
        t_chunk = jnp.asarray(padded[c * chunk_size : (c + 1) * chunk_size])
        carry, out = run_chunk(
            carry,
            t_chunk,
            schedule_obj,
            jnp.float32(epsilon_rel),
            pair_names=pair_names,
            solver_options=solver_options,
        )
        outputs.append(jax.device_get(out))
        if on_chunk is not None:
            on_chunk(min((c + 1) * chunk_size, len(t_grid)) - c * chunk_size)
    k = len(t_grid)
    merged = jax.tree.map(lambda *xs: np.concatenate(xs)[:k], *outputs)
    return {
        "epsilon": merged["epsilon"],
        "transport": {p: merged[p]["transport"] for p in pair_names},
        "regularized": {p: merged[p]["regularized"] for p in pair_names},
        "converged": {p: merged[p]["converged"] for p in pair_names},
        "iterations": {p: merged[p]["iterations"] for p in pair_names},
    }


def _solvers(solver_options: tuple[float, int, int]) -> tuple[sinkhorn.Sinkhorn, sinkhorn.Sinkhorn]:
    """(general solver, solver for symmetric self-pairs) as ott's sinkhorn_divergence sets them."""
    threshold, max_iterations, inner_iterations = solver_options
    common = dict(
        threshold=threshold,
        max_iterations=max_iterations,
        inner_iterations=min(inner_iterations, max_iterations),
    )
    general = sinkhorn.Sinkhorn(**common)
    symmetric = sinkhorn.Sinkhorn(
        parallel_dual_updates=True, momentum=acceleration.Momentum(start=0, value=0.5), **common
    )
    return general, symmetric


def _sqnorm(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x), axis=1)


def _gram(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y.T, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames="pair_names")
def _dense_terms(sets, noise, pair_names):
    """Per pair, the three t-independent [n, m] matrices that give C_t (module docstring).

    D = ‖x_i − y_j‖², N = ‖ξ_i − η_j‖², X = ⟨x_i − y_j, ξ_i − η_j⟩, each float32.
    """
    terms = {}
    data_d = {}
    for p in pair_names:
        xs, ys, xn, yn = PAIRS[p]
        x, y, xi, eta = sets[xs], sets[ys], noise[xn], noise[yn]
        if (xs, ys) not in data_d:
            data_d[(xs, ys)] = jnp.maximum(
                _sqnorm(x)[:, None] + _sqnorm(y)[None, :] - 2.0 * _gram(x, y), 0.0
            )
        dn = jnp.maximum(_sqnorm(xi)[:, None] + _sqnorm(eta)[None, :] - 2.0 * _gram(xi, eta), 0.0)
        cross = (
            jnp.sum(x * xi, axis=1)[:, None]
            - _gram(x, eta)
            - _gram(xi, y)
            + jnp.sum(y * eta, axis=1)[None, :]
        )
        terms[p] = (data_d[(xs, ys)], dn, cross)
    return terms


def _dense_cost(terms, alpha_bar):
    d, n, x = terms
    a2 = alpha_bar
    return jnp.maximum(a2 * d + (1.0 - a2) * n + 2.0 * jnp.sqrt(a2 * (1.0 - a2)) * x, 0.0)


@functools.partial(jax.jit, static_argnames=("pair_names", "solver_options"))
def _dense_chunk(terms, carry, t_chunk, schedule_obj, epsilon_rel, *, pair_names, solver_options):
    """`lax.scan` over a chunk of timesteps, warm-starting every pair from the previous t."""
    general, symmetric = _solvers(solver_options)

    def step(potentials, t):
        alpha_bar = schedule_obj.alphas_cumprod[t]
        costs = {p: _dense_cost(terms[p], alpha_bar) for p in pair_names}
        mean_cost = jnp.mean(costs["ab"])
        new_potentials, out = {}, {"epsilon": epsilon_rel * mean_cost}
        for p in pair_names:
            geom = ott_geometry.Geometry(cost_matrix=costs[p] / mean_cost, epsilon=epsilon_rel)
            solver = symmetric if p in _SYMMETRIC else general
            with jax.numpy_rank_promotion("allow"):  # ott broadcasts implicitly
                res = solver(linear_problem.LinearProblem(geom), init=potentials[p])
            new_potentials[p] = (res.f, res.g)
            out[p] = {
                "transport": jnp.sum(res.matrix * costs[p]),
                "regularized": res.reg_ot_cost * mean_cost,
                "converged": res.converged,
                "iterations": res.n_iters,
            }
        return new_potentials, out

    return jax.lax.scan(step, carry, t_chunk)


@functools.partial(jax.jit, static_argnames=("pair_names", "solver_options", "batch_size"))
def _online_chunk(
    points, carry, t_chunk, schedule_obj, epsilon_rel, *, pair_names, solver_options, batch_size
):
    """As `_dense_chunk`, with the noised sets from `q_sample` and ott's online point clouds."""
    general, symmetric = _solvers(solver_options)

    def noised(x, xi, t):
        return diffusion.q_sample(schedule_obj, x, jnp.full((x.shape[0],), t), xi)

    def step(potentials, t):
        clouds = {}
        for p in pair_names:
            x, y, xi, eta = points[p]
            clouds[p] = (noised(x, xi, t), noised(y, eta, t))
        xa, xb = clouds["ab"]
        # mean_ij ‖x_i − y_j‖² = mean ‖x‖² + mean ‖y‖² − 2 x̄·ȳ, without the [n, m] matrix.
        mean_cost = (
            jnp.mean(_sqnorm(xa))
            + jnp.mean(_sqnorm(xb))
            - 2.0 * jnp.dot(jnp.mean(xa, 0), jnp.mean(xb, 0), precision=_HIGHEST)
        )
        scale = jax.lax.rsqrt(mean_cost)
        new_potentials, out = {}, {"epsilon": epsilon_rel * mean_cost}
        for p in pair_names:
            x, y = clouds[p][0] * scale, clouds[p][1] * scale
            geom = _BlockedPointCloud(x, y, batch_size=batch_size, epsilon=epsilon_rel)
            solver = symmetric if p in _SYMMETRIC else general
            with jax.numpy_rank_promotion("allow"):  # ott broadcasts implicitly
                res = solver(linear_problem.LinearProblem(geom), init=potentials[p])
            new_potentials[p] = (res.f, res.g)
            out[p] = {
                "transport": _blocked_transport_cost(x, y, res.f, res.g, epsilon_rel, batch_size)
                * mean_cost,
                "regularized": res.reg_ot_cost * mean_cost,
                "converged": res.converged,
                "iterations": res.n_iters,
            }
        return new_potentials, out

    return jax.lax.scan(step, carry, t_chunk)


@jax.tree_util.register_pytree_node_class
class _BlockedPointCloud(pointcloud.PointCloud):
    """ott's online squared-Euclidean `PointCloud`, with its blocks mapped by `lax.map`.

    ott-jax 0.6.0's online mode calls `jax.interpreters.batching.is_vmappable`, which JAX 0.9
    removed (ott-jax/ott#700, fixed on ott's main after 0.6.0), so any `batch_size` fails.
    Sinkhorn in log-sum-exp mode only needs `apply_lse_kernel` without `vec` (potential
    updates, marginals, the regularised cost); this computes it `batch_size` output points at
    a time, never holding more than a [batch_size, n] block of the cost.
    """

    def apply_lse_kernel(self, f, g, eps, vec=None, axis=0):
        if vec is not None:
            raise NotImplementedError("_BlockedPointCloud.apply_lse_kernel supports vec=None.")
        # axis=0: one output per column j, ε·log Σ_i exp((f_i − C_ij)/ε); axis=1: per row i.
        # (ott adds and removes the output's own potential for stability; logsumexp already
        # subtracts the maximum, and the two cancel exactly.)
        if axis == 0:
            out = _blocked_lse(self.y, self.x, f, eps, self.batch_size)
        else:
            out = _blocked_lse(self.x, self.y, g, eps, self.batch_size)
        return out, jnp.ones_like(out)


def _blocked_lse(q, p, h, eps, batch_size):
    """out_k = ε·logsumexp_l((h_l − ‖q_k − p_l‖²)/ε) for every row q_k, `batch_size` at a time."""
    num = q.shape[0]
    rows = min(batch_size, num)
    pad = -num % rows
    blocks = jnp.pad(q, ((0, pad), (0, 0))).reshape(-1, rows, q.shape[1])
    p_sq = _sqnorm(p)

    def block(qb):
        c = jnp.maximum(_sqnorm(qb)[:, None] + p_sq[None, :] - 2.0 * _gram(qb, p), 0.0)
        return eps * jax.nn.logsumexp((h[None, :] - c) / eps, axis=1)

    return jax.lax.map(block, blocks).reshape(-1)[:num]


def _blocked_transport_cost(x, y, f, g, eps, batch_size):
    """⟨P, C⟩ with P_ij = exp((f_i + g_j − C_ij)/ε), C_ij = ‖x_i − y_j‖², `batch_size` rows at
    a time (ott materialises P and C for this when d is large)."""
    n = x.shape[0]
    rows = min(batch_size, n)
    pad = -n % rows
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    fp = jnp.pad(f, (0, pad), constant_values=-jnp.inf)
    y_sq = _sqnorm(y)

    def block(args):
        xb, fb = args
        c = jnp.maximum(_sqnorm(xb)[:, None] + y_sq[None, :] - 2.0 * _gram(xb, y), 0.0)
        p = jnp.exp((fb[:, None] + g[None, :] - c) / eps)
        return jnp.sum(p * c)

    blocks = jax.lax.map(block, (xp.reshape(-1, rows, x.shape[1]), fp.reshape(-1, rows)))
    return jnp.sum(blocks)
