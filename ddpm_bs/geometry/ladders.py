"""σ ladders for few-step sampling, by dynamic programming over local truncation errors.

Beyond the paper (Chen et al., arXiv:2305.19947): given a fine "teacher" solution of the
PF-ODE, `step_costs` tabulates the local error of one solver step between every pair of
candidate levels, and `dp_path`/`dp_schedule` pick the K-step ladder with the least summed
error for an NFE budget (EDM's count: Heun's last step to σ = 0 is Euler). `uniform_t_sigmas`
is the DDIM-spaced ladder they are compared with (`comparison`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import sampling, schedules
from ddpm_bs.geometry import denoisers, trajectories


class StepCosts(NamedTuple):
    """Local errors of single solver steps between candidate levels of a teacher ladder.

    Attributes:
      sigmas: [M] candidate levels, strictly decreasing, the last 0 (a subset of the teacher's).
      teacher_index: [M] int, position of each candidate in the teacher's ladder.
      cost: [M, M] float64; cost[i, j] (i < j) is the mean over teacher trajectories of
        ‖step(x^T_{σ_i}; σ_i → σ_j) − x^T_{σ_j}‖, inf where not computed (j ≤ i, or j − i
        beyond the window).
      solver: 'euler' or 'heun' (the step; a step to σ = 0 is Euler for both).
    """

    sigmas: np.ndarray
    teacher_index: np.ndarray
    cost: np.ndarray
    solver: str


DP_SOLVERS = ("euler", "heun")


def nfe_to_steps(nfe: int, solver: str) -> int:
    """Steps K affordable with `nfe` denoiser calls, counted as EDM does (Karras et al. 2022).

    Euler: one call per step, K = nfe. Heun: two calls per step except the last (to σ = 0,
    an Euler step), NFE = 2K − 1, so K = ⌊(nfe + 1)/2⌋ (an even budget leaves one call unused).
    """
    if solver not in DP_SOLVERS:
        raise ValueError(f"solver {solver!r} is unknown; valid solvers: {', '.join(DP_SOLVERS)}.")
    if not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}.")
    return int(nfe) if solver == "euler" else (int(nfe) + 1) // 2


def steps_to_nfe(num_steps: int, solver: str) -> int:
    """The inverse count: K for Euler, 2K − 1 for Heun (EDM's convention)."""
    return int(num_steps) if solver == "euler" else 2 * int(num_steps) - 1


def _teacher_arrays(teacher: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(teacher, trajectories.Trajectory):
        sig, samples = teacher.sigmas, teacher.samples
    else:
        sig, samples = teacher
    sig = np.asarray(trajectories.check_ladder(np.asarray(sig)), np.float64)
    samples = np.asarray(samples, np.float32)
    if sig[-1] != 0:
        raise ValueError(f"the teacher's sigmas must end at 0, got {sig[-1]}.")
    if samples.ndim < 2 or samples.shape[0] != sig.shape[0]:
        raise ValueError(
            f"teacher samples must have shape [F+1, B, ...] with F+1 = {sig.shape[0]} levels, "
            f"got {samples.shape}."
        )
    return sig, samples


def candidate_indices(teacher_sigmas: Any, num_candidates: int) -> np.ndarray:
    """Positions in a teacher ladder (ending at 0) of ≈ `num_candidates` levels, log-σ spaced.

    Always keeps the first level (σ_max), the smallest positive one and the final 0. Levels
    that several log-uniform targets pick are kept once, so fewer may come back.
    """
    sig = np.asarray(teacher_sigmas, np.float64)
    if not isinstance(num_candidates, (int, np.integer)) or num_candidates < 3:
        raise ValueError(f"num_candidates must be an integer ≥ 3, got {num_candidates!r}.")
    positive = sig.size - 1
    if positive + 1 <= num_candidates:
        return np.arange(sig.size)
    log_sig = np.log(sig[:positive])
    targets = np.linspace(log_sig[0], log_sig[-1], num_candidates - 1)
    picked = np.unique([int(np.argmin(np.abs(log_sig - t))) for t in targets])
    return np.append(picked, positive)


def step_costs(
    teacher: trajectories.Trajectory | tuple[Any, Any],
    *,
    denoise: denoisers.Denoiser,
    solver: str = "heun",
    num_candidates: int = 64,
    window: int | None = None,
) -> StepCosts:
    """The local-error table for `dp_schedule`: one solver step between every candidate pair.

    For each candidate i the denoiser is evaluated once at the teacher states x^T_{σ_i}
    (D(x; σ_i), shared by every j) and, for Heun, once more per target j at the Euler
    predictor; all targets of one i are one batched call (jitted; the window is padded to a
    power of two so only a few shapes compile). Cost per pair: mean over the B teacher
    trajectories of the Euclidean norm of the difference to x^T_{σ_j}.

    Args:
      teacher: a fine `Trajectory` (or (sigmas [F+1], samples [F+1, B, ...])) ending at 0,
        e.g. Heun with 200–1000 steps. Its states are where the steps start and what they
        are scored against.
      denoise: the denoiser the teacher was solved with.
      solver: 'euler' or 'heun' (EDM's Heun; its step to σ = 0 is Euler, as in `trajectories.solve`).
      num_candidates: size of the candidate grid (`candidate_indices`); cost is
        O(num_candidates²·B) denoiser calls for the full window.
      window: largest j − i considered (None: all pairs). A window excludes long jumps, so
        only ladders whose steps all fit are reachable.

    Returns:
      A `StepCosts`.
    """
    if solver not in DP_SOLVERS:
        raise ValueError(f"solver {solver!r} is unknown; valid solvers: {', '.join(DP_SOLVERS)}.")
    sig, samples = _teacher_arrays(teacher)
    idx = candidate_indices(sig, num_candidates)
    cand = sig[idx]
    m = idx.size
    if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}.")
    width = m - 1 if window is None else min(int(window), m - 1)
    batch = samples.shape[1]
    ex_shape = samples.shape[2:]

    @jax.jit
    def errors(x, sigma, sigma_next, coef, target):
        # x: [B, ...]; sigma: []; sigma_next: [W]; coef: [W, 5]; target: [W, B, ...] -> [W, B]
        w = sigma_next.shape[0]
        d = denoise(x, jnp.full((batch,), sigma, jnp.float32)).astype(jnp.float32)
        c = [coef[:, k].reshape((w,) + (1,) * x.ndim) for k in range(5)]
        x_next = x_euler = c[0] * x[None] + c[1] * d[None]  # [W, B, ...]
        if solver == "heun":
            safe = jnp.where(sigma_next > 0, sigma_next, sigma)  # σ' = 0: no second call used
            flat = x_euler.reshape((w * batch, *ex_shape))
            d2 = denoise(flat, jnp.repeat(safe, batch)).astype(jnp.float32)
            x_next = c[2] * x[None] + c[3] * d[None] + c[4] * d2.reshape(x_euler.shape)
        diff = (x_next - target).reshape(w, batch, -1)
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))

    cost = np.full((m, m), np.inf)
    cand32 = cand.astype(np.float32)
    for i in range(m - 1):
        js = np.arange(i + 1, min(i + width, m - 1) + 1)
        pad = max(8, 1 << int(np.ceil(np.log2(js.size))))
        js_pad = np.concatenate([js, np.full(pad - js.size, js[-1])])
        coef = _step_coefficients(float(cand32[i]), cand32[js_pad], solver)
        err = errors(
            samples[idx[i]], float(cand32[i]), cand32[js_pad], coef, samples[idx[js_pad]]
        )  # [pad, B]
        cost[i, js] = np.asarray(err, np.float64)[: js.size].mean(axis=1)
    return StepCosts(sigmas=cand.astype(np.float32), teacher_index=idx, cost=cost, solver=solver)


def _step_coefficients(sigma: float, sigma_next: np.ndarray, solver: str) -> np.ndarray:
    """[W, 5] float32: the `sampling.edm_ladder_plan` step σ → σ'_w, one row per target.

    Columns: the first row's (base, D) coefficients, x̃ = c0·x + c1·D (Euler), then the last
    row's (base, D, D̃) ones, x' = c2·x + c3·D + c4·D(x̃; σ') (Heun; the Euler row again, with
    c4 = 0, for Euler and for a step to σ' = 0).
    """
    rows = []
    for s in np.asarray(sigma_next, np.float64):
        plan = sampling.edm_ladder_plan(np.array([sigma, s]), solver)
        first, last = (plan.base_coef[0], *plan.pred_coef[0, :1]), plan.pred_coef[-1, :2]
        rows.append([*first, plan.base_coef[-1], *last])
    return np.asarray(rows, np.float32)


def dp_path(
    costs: StepCosts, num_steps: int, *, through_sigma_min: bool = False
) -> tuple[np.ndarray, float]:
    """The K-step path 0 = i_0 < … < i_K = M − 1 through the candidates with least summed cost.

    V_k(j) = min_i V_{k−1}(i) + cost[i, j], V_0 = [0, inf, …]: O(K·M²), exact.
    With `through_sigma_min` the last step must start at the smallest positive candidate
    (i_{K−1} = M − 2, as EDM's ladders end σ_min → 0); otherwise the DP may stop early with
    an Euler step to 0 from a large σ, which returns the denoiser output D(x; σ) there.

    Returns:
      (indices [K+1] into `costs.sigmas`, the summed cost).
    """
    m = costs.sigmas.shape[0]
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= m - 1:
        raise ValueError(
            f"num_steps must be an integer in [1, {m - 1}] (the candidate steps), got {num_steps!r}."
        )
    cost = costs.cost
    if through_sigma_min:
        cost = cost.copy()
        cost[: m - 2, m - 1] = np.inf
    value = np.full(m, np.inf)
    value[0] = 0.0
    back = np.zeros((num_steps, m), np.int64)
    for k in range(num_steps):
        total = value[:, None] + cost  # [from, to]
        back[k] = np.argmin(total, axis=0)
        value = total[back[k], np.arange(m)]
    if not np.isfinite(value[-1]):
        raise ValueError(
            f"no {num_steps}-step path reaches σ = 0 within the window; widen `window`."
        )
    path = [m - 1]
    for k in range(num_steps - 1, -1, -1):
        path.append(int(back[k, path[-1]]))
    return np.asarray(path[::-1]), float(value[-1])


def snap_to_candidates(sigmas: Any, costs: StepCosts) -> np.ndarray:
    """Indices of the candidates nearest (in log σ) to each level of a ladder; 0 maps to 0.

    The first level maps to candidate 0 (σ_max) and duplicates are merged, so the result is
    a valid path for `path_cost`.
    """
    sig = np.asarray(sigmas, np.float64)
    cand = np.asarray(costs.sigmas, np.float64)
    log_cand = np.log(cand[:-1])
    out = [0]
    for s in sig[1:]:
        j = cand.size - 1 if s <= 0 else int(np.argmin(np.abs(log_cand - np.log(s))))
        if j > out[-1]:
            out.append(j)
    if out[-1] != cand.size - 1:
        out.append(cand.size - 1)
    return np.asarray(out)


def path_cost(costs: StepCosts, indices: Any) -> float:
    """Σ cost[i_k, i_{k+1}] along a path of candidate indices (the DP objective)."""
    idx = np.asarray(indices)
    return float(np.sum(costs.cost[idx[:-1], idx[1:]]))


def dp_schedule(
    teacher: trajectories.Trajectory | tuple[Any, Any] | None,
    nfe: int,
    *,
    denoise: denoisers.Denoiser | None = None,
    solver: str = "heun",
    num_candidates: int = 64,
    window: int | None = None,
    costs: StepCosts | None = None,
    through_sigma_min: bool = False,
) -> np.ndarray:
    """A σ ladder for `nfe` denoiser calls that minimises the summed local truncation error.

    Dynamic programming (`dp_path`) over a candidate grid taken from a fine "teacher"
    solution: the cost of a step σ_i → σ_j is the mean distance between one `solver` step
    started at the teacher's state at σ_i and the teacher's state at σ_j (`step_costs`). The
    objective is the *sum of local errors*; how an error made early is carried (damped or
    amplified) to the end, i.e. the global error, is not modelled. Steps: K =
    `nfe_to_steps(nfe, solver)` (Heun: NFE = 2K − 1, the last step Euler, as EDM counts).

    Args:
      teacher: the fine teacher trajectory, or (sigmas_fine [F+1], samples_fine [F+1, B, ...]);
        may be None when `costs` is given.
      nfe: the budget of denoiser calls.
      denoise: the teacher's denoiser (needed unless `costs` is given).
      solver: 'heun' or 'euler'.
      num_candidates, window: as in `step_costs`.
      costs: a precomputed `step_costs` table (reuse it across budgets; its solver wins).
      through_sigma_min: end with σ_min → 0 like EDM (see `dp_path`).

    Returns:
      float32 [K+1], σ descending from the teacher's σ_max, ending with 0.
    """
    if costs is None:
        if teacher is None or denoise is None:
            raise ValueError("dp_schedule needs `teacher` and `denoise`, or precomputed `costs`.")
        costs = step_costs(
            teacher,
            denoise=denoise,
            solver=solver,
            num_candidates=num_candidates,
            window=window,
        )
    path, _ = dp_path(costs, nfe_to_steps(nfe, costs.solver), through_sigma_min=through_sigma_min)
    return np.asarray(costs.sigmas[path], np.float32)


def uniform_t_sigmas(schedule: schedules.Schedule, num_steps: int, t_max: int) -> np.ndarray:
    """σ at `num_steps` evenly spaced timesteps from t_max down to 0 of a VP grid, then 0.

    The "uniform-in-t" ladder (DDIM's spacing) over the same range as a snapped EDM ladder.
    Timesteps that round to the same integer are merged. float32 [≤ num_steps + 1].
    """
    ts = np.unique(np.round(np.linspace(t_max, 0, num_steps)).astype(np.int64))[::-1]
    grid = np.asarray(schedule.sigmas, np.float64)
    return np.append(grid[ts], 0.0).astype(np.float32)
