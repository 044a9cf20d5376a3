"""The deterministic ODE solvers as plans: DPM-Solver-1/2/3, DPM-Solver++(2M), EDM Euler/Heun.

Every deterministic solver here is linear in its state and the model's predictions, with
coefficients fixed by the grid: `SolverPlan` holds those coefficients, computed once in float64
numpy, and one scan runs any plan with exactly one model call per iteration (so DPM-Solver-3 or
Heun compile the model once, like DDIM). Times are snapped to the model's integer grid (nearest
in λ); see the package docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import diffusion, schedules
from ddpm_bs.sampling.ancestral import (
    ModelFn,
    _apply,
    _check_steps,
    _constrain,
    space_timesteps,
)

SKIP_TYPES = ("time_uniform", "logSNR")

# --- Deterministic solvers as plans: one model call per scan iteration -------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SolverPlan:
    """A deterministic solver unrolled into rows, one model evaluation per row.

    The scan carries the current point x, the base point (the state at the start of the current
    solver step) and three prediction slots. Row n evaluates the model at
    (in_scale[n]·x, timesteps[n]), stores its prediction (ε̂ or x̂0, per `prediction`) in slot[n],
    and moves to x ← base_coef[n]·base + Σ_k pred_coef[n, k]·slot_k; when rebase[n] the new x
    also becomes the base. The last row is the final denoising step, so x ends as x0.
    """

    timesteps: np.ndarray  # [N] int32: original timestep the model sees at row n.
    in_scale: np.ndarray  # [N] float64: model input = in_scale · x (1 for VP, √ᾱ for VE states).
    slot: np.ndarray  # [N] int32 in {0, 1, 2}: where row n's prediction is kept.
    base_coef: np.ndarray  # [N] float64
    pred_coef: np.ndarray  # [N, 3] float64
    rebase: np.ndarray  # [N] bool: row n ends a solver step.
    prediction: str  # 'eps' or 'x0'.
    init_scale: float  # the first point is init_scale · N(0, I).

    @property
    def nfe(self) -> int:
        """Model evaluations (the scan's length)."""
        return int(self.timesteps.shape[0])


class _Rows:
    def __init__(self):
        self.rows = []

    def add(self, t, slot, base_coef, pred_coef, rebase, in_scale=1.0):
        pc = np.zeros(3)
        pc[: len(pred_coef)] = pred_coef
        self.rows.append((int(t), float(in_scale), int(slot), float(base_coef), pc, bool(rebase)))

    def plan(self, prediction: str, init_scale: float) -> SolverPlan:
        t, in_scale, slot, base, pred, rebase = zip(*self.rows, strict=True)
        return SolverPlan(
            timesteps=np.asarray(t, np.int32),
            in_scale=np.asarray(in_scale),
            slot=np.asarray(slot, np.int32),
            base_coef=np.asarray(base),
            pred_coef=np.stack(pred),
            rebase=np.asarray(rebase),
            prediction=prediction,
            init_scale=float(init_scale),
        )


def _vp_arrays(schedule: schedules.Schedule):
    """float64 α_t = √ᾱ_t, σ_t = √(1−ᾱ_t) and λ_t = log(α_t/σ_t) on the T grid."""
    ac = schedules.alphas_cumprod64(schedule)
    alpha, sigma = np.sqrt(ac), np.sqrt(1.0 - ac)
    return alpha, sigma, np.log(alpha) - np.log(sigma)


def _nearest_index(lam: np.ndarray, targets) -> np.ndarray:
    """Indices of the grid λ nearest to each target λ (= nearest in log σ)."""
    targets = np.atleast_1d(np.asarray(targets, np.float64))
    return np.argmin(np.abs(lam[None, :] - targets[:, None]), axis=1)


def _dedupe(idx) -> np.ndarray:
    """Drops consecutive repeats (zero-length steps) from a descending index sequence."""
    idx = np.asarray(idx)
    return idx[np.concatenate([[True], idx[1:] != idx[:-1]])]


def _singlestep_orders(nfe: int, order: int) -> list[int]:
    """dpm-solver's split of `nfe` evaluations into singlestep orders ("DPM-Solver-fast")."""
    if order == 3:
        k = nfe // 3 + 1
        if nfe % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        if nfe % 3 == 1:
            return [3] * (k - 1) + [1]
        return [3] * (k - 1) + [2]
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    return [1] * nfe


def _check_choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(
            f"{name}={value!r} is invalid; valid values: {', '.join(map(str, valid))}."
        )


def _time_points(lam, num_timesteps: int, count: int, skip_type: str) -> np.ndarray:
    """`count` grid indices from T−1 down to 0, uniform in t or in λ (then snapped, deduped)."""
    if skip_type == "time_uniform":
        return np.asarray(space_timesteps(num_timesteps, count))[::-1]
    targets = np.linspace(lam[num_timesteps - 1], lam[0], count)
    return _dedupe(_nearest_index(lam, targets))


def dpm_solver_plan(
    schedule: schedules.Schedule,
    steps: int = 20,
    *,
    order: int = 3,
    skip_type: str = "time_uniform",
) -> SolverPlan:
    """Singlestep DPM-Solver-1/2/3 (Lu et al. 2022, Algorithms 1, 4, 5), noise prediction.

    With h = λ_t − λ_s and φ1 = e^h − 1, φ2 = φ1/h − 1, φ3 = φ2/h − 1/2 (Eq. 3.7's integrals):
      order 1 (DDIM): x_t = (α_t/α_s) x_s − σ_t φ1 ε_s
      order 2: u = (α_{s1}/α_s) x_s − σ_{s1}(e^{r1 h}−1) ε_s;
               x_t = (α_t/α_s) x_s − σ_t φ1 ε_s − σ_t φ1/(2 r1) (ε_{s1} − ε_s)
      order 3: u1 as above at r1; u2 = (α_{s2}/α_s) x_s − σ_{s2}(e^{r2 h}−1) ε_s
                 − σ_{s2} (r2/r1)((e^{r2 h}−1)/(r2 h) − 1)(ε_{s1} − ε_s);
               x_t = (α_t/α_s) x_s − σ_t (φ1 ε_s + φ2 D1 + φ3 D2), with D1 ≈ h ε', D2 ≈ h² ε''
               from the divided differences of (ε_s, ε_{s1}, ε_{s2}) (dpm-solver's 'taylor'
               form, third order for any r1 ≠ r2, which snapping needs).
    Intermediate points sit at λ_s + r h (r1 = 1/2 for order 2; 1/3, 2/3 for order 3), snapped.

    `steps` counts model evaluations, like DDIM's: steps − 1 go to the ODE from t = T−1 to
    t = 0, split into orders as dpm-solver does, and one to the final x̂0 at t = 0 (dpm-solver's
    `denoise_to_zero`, and DDIM's last step). 'time_uniform' takes the outer points from the
    guided-diffusion grid of `steps` points (so order 1 is DDIM on the same grid exactly);
    'logSNR' spaces them uniformly in λ.
    """
    num_timesteps = schedule.num_timesteps
    _check_steps(steps, num_timesteps, minimum=2)
    _check_choice("order", order, (1, 2, 3))
    _check_choice("skip_type", skip_type, SKIP_TYPES)
    alpha, sigma, lam = _vp_arrays(schedule)
    orders = _singlestep_orders(steps - 1, order)
    if skip_type == "time_uniform":
        fine = np.asarray(space_timesteps(num_timesteps, steps))[::-1]
        outer = fine[np.cumsum([0] + orders)]
    else:
        outer = _time_points(lam, num_timesteps, len(orders) + 1, skip_type)
        orders = orders[: len(outer) - 1]

    rows = _Rows()
    for o, s, t in zip(orders, outer[:-1], outer[1:], strict=True):
        o = min(o, s - t)  # room for o − 1 distinct interior points
        h = lam[t] - lam[s]
        phi1 = np.expm1(h)
        if o == 1:
            rows.add(s, 0, alpha[t] / alpha[s], [-sigma[t] * phi1], rebase=True)
            continue
        if o == 2:
            s1 = int(np.clip(_nearest_index(lam, lam[s] + 0.5 * h)[0], t + 1, s - 1))
            r1 = (lam[s1] - lam[s]) / h
            rows.add(s, 0, alpha[s1] / alpha[s], [-sigma[s1] * np.expm1(r1 * h)], rebase=False)
            c = sigma[t] * phi1 / (2.0 * r1)
            rows.add(s1, 1, alpha[t] / alpha[s], [-sigma[t] * phi1 + c, -c], rebase=True)
            continue
        s1 = int(np.clip(_nearest_index(lam, lam[s] + h / 3.0)[0], t + 2, s - 1))
        s2 = int(np.clip(_nearest_index(lam, lam[s] + 2.0 * h / 3.0)[0], t + 1, s1 - 1))
        r1, r2 = (lam[s1] - lam[s]) / h, (lam[s2] - lam[s]) / h
        rows.add(s, 0, alpha[s1] / alpha[s], [-sigma[s1] * np.expm1(r1 * h)], rebase=False)
        phi22 = np.expm1(r2 * h) / (r2 * h) - 1.0
        c = sigma[s2] * (r2 / r1) * phi22
        rows.add(s1, 1, alpha[s2] / alpha[s], [-sigma[s2] * np.expm1(r2 * h) + c, -c], rebase=False)
        e0, e1, e2 = np.eye(3)
        d1_0, d1_1 = (e1 - e0) / r1, (e2 - e0) / r2
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        phi2 = phi1 / h - 1.0
        phi3 = phi2 / h - 0.5
        coef = -sigma[t] * (phi1 * e0 + phi2 * d1 + phi3 * d2)
        rows.add(s2, 2, alpha[t] / alpha[s], coef, rebase=True)
    # Final denoising at t = 0: x0 = (x − σ_0 ε̂)/α_0.
    rows.add(0, 0, 1.0 / alpha[0], [-sigma[0] / alpha[0]], rebase=True)
    return rows.plan("eps", init_scale=1.0)


def dpm_solver_pp_plan(
    schedule: schedules.Schedule,
    steps: int = 25,
    *,
    order: int = 2,
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
) -> SolverPlan:
    """Multistep DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), data prediction.

    With h = λ_t − λ_s, r = h_prev/h and D = x̂0 predictions:
      x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) [(1 + 1/(2r)) D_s − 1/(2r) D_prev],
    first order (DDIM) at the first step and, when there are fewer than 10 ODE steps and
    `lower_order_final`, at the last (dpm-solver's defaults). `steps` counts evaluations:
    one at each of `steps` grid points from T−1 to 0 (the guided-diffusion grid for
    'time_uniform', the same points DDIM uses), the last one giving x̂0 at t = 0.
    `order=1` is DDIM in data-prediction form.
    """
    num_timesteps = schedule.num_timesteps
    _check_steps(steps, num_timesteps, minimum=2)
    _check_choice("order", order, (1, 2))
    _check_choice("skip_type", skip_type, SKIP_TYPES)
    alpha, sigma, lam = _vp_arrays(schedule)
    points = _time_points(lam, num_timesteps, steps, skip_type)
    num_ode = len(points) - 1
    rows = _Rows()
    for i in range(num_ode):
        s, t = points[i], points[i + 1]
        h = lam[t] - lam[s]
        phi1 = np.expm1(-h)
        cur, prev = i % 2, (i - 1) % 2
        pred = np.zeros(3)
        last_low = lower_order_final and num_ode < 10 and i == num_ode - 1
        if order == 1 or i == 0 or last_low:
            pred[cur] = -alpha[t] * phi1
        else:
            r = (lam[s] - lam[points[i - 1]]) / h
            pred[cur] = -alpha[t] * phi1 * (1.0 + 0.5 / r)
            pred[prev] = alpha[t] * phi1 * 0.5 / r
        rows.add(s, cur, sigma[t] / sigma[s], pred, rebase=True)
    last = num_ode % 2
    rows.add(points[-1], last, 0.0, np.eye(3)[last], rebase=True)  # x0 = x̂0 at t = 0
    return rows.plan("x0", init_scale=1.0)


def edm_plan(
    schedule: schedules.Schedule,
    steps: int = 18,
    *,
    solver: str = "heun",
    sigma_min: float = schedules.SIGMA_MIN,
    sigma_max: float = schedules.SIGMA_MAX,
    rho: float = schedules.RHO,
) -> SolverPlan:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) for a discrete VP model.

    The state is x_ve = x_vp/√ᾱ at σ = √((1−ᾱ)/ᾱ); D(x; σ) is the VP model's x̂0 at
    x_vp = x/√(1+σ²), t = the grid index of σ. The ρ-ladder (`schedules.edm_sigmas`, `steps`
    levels) runs from min(σ_max, σ_{T−1}) to max(σ_min, σ_0) and is rounded to the grid, as
    EDM's `round_sigma` does for its iDDPM model, so D is evaluated exactly where the model was
    trained; repeated levels (zero-length steps, which change nothing) are dropped.
      Euler:  x_{i+1} = x_i + (σ_{i+1} − σ_i) d_i,   d_i = (x_i − D(x_i; σ_i))/σ_i
      Heun:   x' as Euler, x_{i+1} = x_i + (σ_{i+1} − σ_i)(d_i + d')/2 while σ_{i+1} > 0.
    Evaluations: N levels (Euler) or 2N − 1 (Heun), N ≤ `steps` after rounding.
    """
    num_timesteps = schedule.num_timesteps
    _check_steps(steps, num_timesteps)
    _check_choice("solver", solver, ("euler", "heun"))
    alpha, sigma, lam = _vp_arrays(schedule)
    grid = sigma / alpha
    lo, hi = max(sigma_min, grid[0]), min(sigma_max, grid[-1])
    if not lo < hi:
        raise ValueError(
            f"sigma_min={sigma_min}, sigma_max={sigma_max} leave nothing of the schedule's range "
            f"[{grid[0]:.4g}, {grid[-1]:.4g}]."
        )
    ladder = schedules.edm_sigmas(steps, lo, hi, rho, append_zero=False).astype(np.float64)
    idx = _dedupe(_nearest_index(lam, -np.log(ladder)))
    return edm_ladder_plan(np.append(grid[idx], 0.0), solver, timesteps=idx, in_scale=alpha[idx])


def edm_ladder_plan(
    sigmas: np.ndarray,
    solver: str = "heun",
    *,
    timesteps: np.ndarray | None = None,
    in_scale: np.ndarray | None = None,
) -> SolverPlan:
    """EDM's Euler or Heun steps (Karras et al. 2022, Algorithm 1 without churn) down a σ ladder.

    The steps of `edm_plan` on any VE ladder σ_0 > σ_1 > … > σ_{L−1} ≥ 0; a step to σ = 0 is
    Euler, x = D. Row n evaluates D at level `timesteps[n]`'s σ with input `in_scale`·x.

    Args:
      sigmas: [L] the ladder, float64.
      solver: 'euler' or 'heun'.
      timesteps: [L] what the model is given at each level (a final σ = 0 is never
        evaluated); default the level's index in `sigmas`, as `run_plan_denoiser` reads it.
      in_scale: [L] the model's input scale at each level; default 1 (a VE denoiser).
    """
    _check_choice("solver", solver, ("euler", "heun"))
    sig = np.asarray(sigmas, np.float64)
    levels = np.arange(sig.size) if timesteps is None else np.asarray(timesteps)
    scale = np.ones(sig.size) if in_scale is None else np.asarray(in_scale, np.float64)
    rows = _Rows()
    for i in range(sig.size - 1):
        a = sig[i + 1] / sig[i]
        heun = solver == "heun" and sig[i + 1] > 0
        rows.add(levels[i], 0, a, [1.0 - a], rebase=not heun, in_scale=scale[i])
        if heun:
            delta = sig[i + 1] - sig[i]
            coef = [0.5 * delta * (1.0 / sig[i + 1] - 2.0 / sig[i]), -0.5 * delta / sig[i + 1]]
            rows.add(levels[i + 1], 1, a, coef, rebase=True, in_scale=scale[i + 1])
    return rows.plan("x0", init_scale=sig[0])


def run_plan(
    plan: SolverPlan,
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    target: str = "eps",
    learn_sigma: bool = False,
    clip_denoised: bool = False,
    y: jax.Array | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """Runs a `SolverPlan` from x = init_scale · N(0, I) (drawn as DDIM draws it) to x0.

    `clip_denoised` clips x̂0 to [−1, 1] (and re-derives ε̂ from it), as DDIM does.
    """
    init_key, _ = jax.random.split(key)  # the same x_T as ddim_sample for the same key
    x = jax.random.normal(init_key, shape, jnp.float32) * jnp.float32(plan.init_scale)
    x = _constrain(x, batch_sharding)
    y = _constrain(y, batch_sharding)

    def predict(x_vp, t):
        out = _apply(model_fn, x_vp, t, y).astype(jnp.float32)
        if learn_sigma:
            out, _ = diffusion.split_learned_sigma(out, shape[-1])
        x0, eps = diffusion.x0_and_eps_from_output(target, schedule, x_vp, t, out)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(schedule, x_vp, t, x0)
        return eps if plan.prediction == "eps" else x0

    def body(carry, row):
        base, x, slots = carry
        t, in_scale, _, _, _, rebase = row
        pred = predict(x * in_scale, jnp.full((shape[0],), t, jnp.int32))
        x, slots = _plan_update(carry, row, pred)
        x = _constrain(x, batch_sharding)
        return (jnp.where(rebase, x, base), x, slots), None

    zeros = jnp.zeros_like(x)
    (_, x, _), _ = jax.lax.scan(body, (x, x, (zeros, zeros, zeros)), _plan_rows(plan))
    return x


def run_plan_denoiser(
    plan: SolverPlan,
    denoise: Callable[[jax.Array, jax.Array], jax.Array],
    sigmas: Any,
    x: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Runs an x0-prediction plan from `x` with a VE denoiser D(x; σ) in place of a VP model.

    Row n calls denoise(in_scale[n]·x, σ [B]) at σ = sigmas[timesteps[n]] (with
    `edm_ladder_plan`'s default timesteps, `sigmas` is the ladder itself).

    Args:
      plan: a `SolverPlan` predicting x0 (e.g. `edm_ladder_plan(sigmas)`).
      denoise: (x [B, ...], sigma [B]) -> D(x; σ) [B, ...].
      sigmas: [M] the σ of each index the plan's timesteps name.
      x: [B, ...] the state at the plan's first level.

    Returns:
      (xs, preds), each [N, B, ...] float32: the state after row n and the D row n called.
    """
    if plan.prediction != "x0":
        raise ValueError(f"run_plan_denoiser needs a plan predicting x0, got {plan.prediction!r}.")
    sig = jnp.asarray(sigmas, jnp.float32)
    x = jnp.asarray(x, jnp.float32)

    def body(carry, row):
        base, x, slots = carry
        t, in_scale, _, _, _, rebase = row
        pred = denoise(x * in_scale, jnp.full((x.shape[0],), sig[t])).astype(jnp.float32)
        x, slots = _plan_update(carry, row, pred)
        return (jnp.where(rebase, x, base), x, slots), (x, pred)

    zeros = jnp.zeros_like(x)
    _, (xs, preds) = jax.lax.scan(body, (x, x, (zeros, zeros, zeros)), _plan_rows(plan))
    return xs, preds


def _plan_rows(plan: SolverPlan) -> tuple[jax.Array, ...]:
    """The plan's rows as the scan's inputs (coefficients in float32)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return (
        jnp.asarray(plan.timesteps),
        f32(plan.in_scale),
        jnp.asarray(plan.slot),
        f32(plan.base_coef),
        f32(plan.pred_coef),
        jnp.asarray(plan.rebase),
    )


def _plan_update(carry, row, pred: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One row after its model call: `pred` into its slot, x ← base_coef·base + Σ pred_coef·slots."""
    base, _, slots = carry
    _, _, slot, base_coef, pred_coef, _ = row
    slots = tuple(jnp.where(slot == k, pred, slots[k]) for k in range(3))
    x = base_coef * base
    for k in range(3):
        x = x + pred_coef[k] * slots[k]
    return x, slots


def dpm_solver_sample(
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: int = 20,
    order: int = 3,
    skip_type: str = "time_uniform",
    **kwargs,
) -> jax.Array:
    """Singlestep DPM-Solver (see `dpm_solver_plan`); kwargs as `run_plan`."""
    plan = dpm_solver_plan(schedule, steps, order=order, skip_type=skip_type)
    return run_plan(plan, model_fn, schedule, shape, key, **kwargs)


def dpm_solver_pp_sample(
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: int = 25,
    order: int = 2,
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
    **kwargs,
) -> jax.Array:
    """Multistep DPM-Solver++(2M) (see `dpm_solver_pp_plan`); kwargs as `run_plan`."""
    plan = dpm_solver_pp_plan(
        schedule,
        steps,
        order=order,
        skip_type=skip_type,
        lower_order_final=lower_order_final,
    )
    return run_plan(plan, model_fn, schedule, shape, key, **kwargs)


def edm_sample(
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: int = 18,
    solver: str = "heun",
    sigma_min: float = schedules.SIGMA_MIN,
    sigma_max: float = schedules.SIGMA_MAX,
    rho: float = schedules.RHO,
    **kwargs,
) -> jax.Array:
    """EDM Euler or Heun through the VP→VE conversion (see `edm_plan`); kwargs as `run_plan`."""
    plan = edm_plan(
        schedule,
        steps,
        solver=solver,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
    )
    return run_plan(plan, model_fn, schedule, shape, key, **kwargs)
