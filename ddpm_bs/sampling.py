"""Samplers of the reverse process, each a `lax.scan` over its step schedule.

A model enters as `model_fn(x [B, H, W, C], t [B] int32) -> output`, with t indices on the
original T-step grid; the output is in the parameterisation `target` ('eps', 'x0' or 'v') and
carries 2C channels when the model learns its variances (the variance channels are dropped by
every sampler but DDPM). Class-conditional models take a third argument: pass `y` [B] to any
sampler and it calls `model_fn(x, t, y)` (or close over the labels yourself).

Methods (`sample(method, ...)` dispatches on the name; `METHODS` lists them):
  'ddpm'          ancestral sampling (DDPM Algorithm 2), optionally respaced.
  'ddim'          DDIM (Song et al. 2021, Eq. 12) on a guided-diffusion respaced grid.
  'dpm_solver'    singlestep DPM-Solver-1/2/3 (Lu et al. 2022), noise prediction.
  'dpm_solver++'  multistep DPM-Solver++(2M) (Lu et al. 2022b), data prediction.
  'edm_euler'     EDM Algorithm 1 without the correction (Karras et al. 2022), through VP→VE.
  'edm_heun'      EDM Algorithm 1 (deterministic Heun, ρ = 7 ladder), through VP→VE.
DDIM and DDPM take Epsilon Scaling (Ning et al. 2024) as `eps_scale=(k, b)`.

Discrete time. The ODE solvers need the noise level at the times they step through; here every
such time is snapped to the model's integer grid (nearest in λ = log(√ᾱ/√(1−ᾱ)), the rule of
`schedules.sigma_to_timestep`), and the solver's coefficients use the exact ᾱ of the index the
model sees. dpm-solver's 'discrete' schedule instead interpolates log ᾱ piecewise-linearly and
feeds the model a fractional index t·T − 1; that needs a model that accepts float timesteps and
leaves an O(1/T) mismatch between the noise level the solver assumes and the one the model was
trained at. Snapping needs neither; the price is that the step sizes are rounded, so the
multi-point formulas here are the general-ratio ones (exact order for any r), and a step too
short to hold its intermediate points drops to the order it can hold.

Every deterministic solver is linear in its state and the model's predictions, with coefficients
fixed by the grid: `SolverPlan` holds those coefficients, computed once in float64 numpy, and one
scan runs any plan with exactly one model call per iteration (so DPM-Solver-3 or Heun compile
the model once, like DDIM).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_bs import diffusion, fields, schedules

ModelFn = Callable[..., jax.Array]

METHODS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++", "edm_euler", "edm_heun")
SKIP_TYPES = ("time_uniform", "logSNR")


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """The timesteps kept when respacing, with guided-diffusion's `section_counts` semantics.

    "ddimN" keeps every k-th step, k chosen so exactly N steps remain, starting at 0; "a,b,c"
    splits [0, T) into equal sections and keeps a, b, c evenly spaced steps in each (the ends
    of each section included). An int N is the same as "N" (one section).
    """
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if section_counts.startswith("ddim"):
        wanted = int(section_counts[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(
            f"section_counts={section_counts!r}: no integer stride gives exactly {wanted} of "
            f"{num_timesteps} steps; use a plain count such as '{wanted}'."
        )
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(
                f"section_counts={section_counts!r}: section {i} has {size} steps, cannot keep {count}."
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, not multiplied, so rounding matches guided-diffusion
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclasses.dataclass(frozen=True)
class Respacing:
    """A respaced schedule and the map from its step indices to the original timesteps."""

    schedule: schedules.Schedule
    timestep_map: np.ndarray  # [N] int32: original timestep of each respaced index.


def respace(schedule: schedules.Schedule, section_counts: str | int) -> Respacing:
    """`schedule` on guided-diffusion's respaced grid (`space_timesteps`)."""
    kept = space_timesteps(schedule.num_timesteps, section_counts)
    return Respacing(schedules.respaced(schedule, kept), np.asarray(kept, np.int32))


# --- DDIM and DDPM (respaced, optionally stochastic) -------------------------------------------


def ddim_sample(
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: str | int = 100,
    eta: float = 0.0,
    target: str = "eps",
    learn_sigma: bool = False,
    clip_denoised: bool = True,
    eps_scale: tuple[float, float] = (0.0, 1.0),
    y: jax.Array | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """DDIM (Song et al. 2021, Eq. 12) on a respaced grid; eta=1 is ancestral-like sampling.

    x_{prev} = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ z,  σ = η √((1−ᾱ_prev)/(1−ᾱ)) √(1−ᾱ/ᾱ_prev).

    Args:
      steps: respacing (`space_timesteps`): a count, "a,b,c" sections or "ddimN".
      eps_scale: Epsilon Scaling (k, b): ε̂ is divided by λ_i = k·i + b before x̂0 is formed,
        i ∈ {0..N−1} the respaced step index (0 the last, least noisy step), as ADM-ES indexes
        its `eps_scaler`; (0, 1) is off; ADM-ES uses (0, 1.017) for CIFAR-10 at N = 100 (DDPM).
      y: class labels [B] passed to `model_fn(x, t, y)`; None for unconditional models.
      batch_sharding: if given, the state is constrained to it at every step (see
        `sharded_sampler`).
    Returns x0 samples of `shape` in float32.
    """
    num_timesteps = schedule.num_timesteps
    _check_steps(steps, num_timesteps)
    sp = respace(schedule, steps)
    s = sp.schedule

    def step(x, i, t, out, noise):
        if learn_sigma:
            out, _ = diffusion.split_learned_sigma(out, shape[-1])
        out = _scale_eps(out, eps_scale, i, target, s, x, t)
        x0, eps = diffusion.x0_and_eps_from_output(target, s, x, t, out)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(s, x, t, x0)
        ac = s.alphas_cumprod[i]
        ac_prev = s.alphas_cumprod_prev[i]
        sigma = eta * jnp.sqrt((1 - ac_prev) / (1 - ac)) * jnp.sqrt(1 - ac / ac_prev)
        mean = jnp.sqrt(ac_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ac_prev - sigma**2, 0.0)) * eps
        return mean + jnp.where(i > 0, sigma, 0.0) * noise

    deterministic = isinstance(eta, (int, float)) and eta == 0
    return _reverse_scan(model_fn, sp, shape, key, step, y, batch_sharding, not deterministic)


def ddpm_sample(
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: str | int | None = None,
    target: str = "eps",
    learn_sigma: bool = False,
    fixed_variance: str = "small",
    clip_denoised: bool = True,
    eps_scale: tuple[float, float] = (0.0, 1.0),
    y: jax.Array | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """Ancestral sampling from p(x_{t−1}|x_t) (DDPM Algorithm 2), optionally respaced.

    `eps_scale`, `y` and `batch_sharding` as in `ddim_sample`; with Epsilon Scaling only the
    mean channels are rescaled (a learned variance is left as the model gave it).
    """
    num_timesteps = schedule.num_timesteps
    steps = num_timesteps if steps is None else steps
    _check_steps(steps, num_timesteps)
    sp = respace(schedule, steps)
    s = sp.schedule

    def step(x, i, t, out, noise):
        if _scaling_on(eps_scale):
            var = None
            if learn_sigma:
                out, var = diffusion.split_learned_sigma(out, shape[-1])
            out = _scale_eps(out, eps_scale, i, target, s, x, t)
            if learn_sigma:
                out = jnp.concatenate([out, var], axis=-1)
        p = diffusion.p_mean_variance(
            s,
            out,
            x,
            t,
            target=target,
            learn_sigma=learn_sigma,
            fixed_variance=fixed_variance,
            clip_denoised=clip_denoised,
        )
        return p["mean"] + jnp.where(i > 0, jnp.exp(0.5 * p["log_variance"]), 0.0) * noise

    return _reverse_scan(model_fn, sp, shape, key, step, y, batch_sharding)


def _scaling_on(eps_scale) -> bool:
    k, b = eps_scale
    return not (k == 0 and b == 1)


def _scale_eps(out, eps_scale, i, target, s, x, t):
    """The model output with its implied ε̂ divided by λ_i = k·i + b (Ning et al. 2024, Epsilon Scaling).

    For target 'eps' that is out/λ_i; for 'x0' and 'v' the output is rewritten so that it
    implies (x̂0', ε̂/λ_i) with x̂0' = (x − √(1−ᾱ) ε̂/λ_i)/√ᾱ, as ADM-ES forms x̂0 from the scaled ε̂.
    (0, 1) returns `out` untouched.
    """
    if not _scaling_on(eps_scale):
        return out
    k, b = eps_scale
    lam = k * i.astype(jnp.float32) + b
    if target == "eps":
        return out / lam
    _, eps = diffusion.x0_and_eps_from_output(target, s, x, t, out)
    eps = eps / lam
    x0 = diffusion.predict_x0_from_eps(s, x, t, eps)
    return diffusion.target_of(target, s, x0, eps, t)


def _reverse_scan(
    model_fn: ModelFn, sp: Respacing, shape, key, step, y=None, batch_sharding=None, noisy=True
) -> jax.Array:
    """Runs `step(x, i, t, model_output, noise) -> x` from x ~ N(0, I) down the respaced grid.

    i counts down from N−1 to 0 (the respaced index, t = [i]*B); the model sees the original
    timestep; the noise of step i is drawn from fold_in(key, i), so draws do not depend on N.
    `noisy=False` passes zeros instead (deterministic DDIM skips the draws; same result).
    """
    tmap = jnp.asarray(sp.timestep_map)
    init_key, loop_key = jax.random.split(key)
    x = _constrain(jax.random.normal(init_key, shape, jnp.float32), batch_sharding)
    y = _constrain(y, batch_sharding)

    def body(x, i):
        t = jnp.full((shape[0],), i, jnp.int32)
        out = _apply(model_fn, x, tmap[t], y).astype(jnp.float32)
        if noisy:
            noise = jax.random.normal(jax.random.fold_in(loop_key, i), shape, jnp.float32)
        else:
            noise = jnp.zeros(shape, jnp.float32)
        x = step(x, i, t, out, _constrain(noise, batch_sharding))
        return _constrain(x, batch_sharding), None

    x, _ = jax.lax.scan(body, x, jnp.arange(sp.schedule.num_timesteps - 1, -1, -1))
    return x


def _apply(model_fn: ModelFn, x, t, y):
    return model_fn(x, t) if y is None else model_fn(x, t, y)


def _constrain(x, sharding):
    if x is None or sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


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


def _check_steps(steps, num_timesteps: int, minimum: int = 1) -> None:
    if isinstance(steps, str):
        return  # section counts: space_timesteps validates them
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"steps must be an int or a section-count string, got {steps!r}.")
    if not minimum <= steps <= num_timesteps:
        raise ValueError(
            f"steps={steps} is out of range: need {minimum} ≤ steps ≤ num_timesteps={num_timesteps}."
        )


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


# --- One entry point, and sharding -------------------------------------------------------------


def sample(
    method: str,
    model_fn: ModelFn,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    key: jax.Array,
    **opts: Any,
) -> jax.Array:
    """Samples x0 [*shape] float32 with `method` ∈ METHODS; `opts` go to that sampler.

    Common options: steps, target, learn_sigma, clip_denoised, y, batch_sharding. Per method:
    'ddim' eta, eps_scale; 'ddpm' fixed_variance, eps_scale; 'dpm_solver' order (1–3),
    skip_type; 'dpm_solver++' order (1–2), skip_type, lower_order_final; 'edm_*' sigma_min,
    sigma_max, rho.
    """
    samplers = {
        "ddpm": ddpm_sample,
        "ddim": ddim_sample,
        "dpm_solver": dpm_solver_sample,
        "dpm_solver++": dpm_solver_pp_sample,
        "edm_euler": lambda *a, **k: edm_sample(*a, solver="euler", **k),
        "edm_heun": lambda *a, **k: edm_sample(*a, solver="heun", **k),
    }
    if method not in samplers:
        raise ValueError(f"method={method!r} is unknown; valid methods: {', '.join(METHODS)}.")
    return samplers[method](model_fn, schedule, shape, key, **opts)


def sharded_sampler(
    method: str,
    apply_fn: Callable[..., jax.Array],
    mesh: Mesh,
    schedule: schedules.Schedule,
    shape: tuple[int, ...],
    *,
    axis: str = "data",
    **opts: Any,
) -> Callable[..., jax.Array]:
    """A jitted `fn(params, key, y=None) -> x0 [*shape]` with the batch split over `mesh[axis]`.

    `apply_fn(params, x, t[, y])` is the model with its parameters as an argument (so they are
    not baked into the program); params keep whatever sharding they arrive with (replicated
    for data parallelism). The state, the per-step noise and y are constrained to
    NamedSharding(mesh, P(axis)) inside the loop, and so is the output. With
    `jax_threefry_partitionable` on, the draws, and so the samples, equal the unsharded ones.
    Compile once, call per chunk with fresh keys.
    """
    n = mesh.shape[axis]
    if shape[0] % n:
        raise ValueError(
            f"shape[0]={shape[0]} (samples per call) must be divisible by the {n} devices on "
            f"mesh axis {axis!r}."
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; valid methods: {', '.join(METHODS)}.")
    batch = NamedSharding(mesh, P(axis))

    def fn(params, key, y=None):
        def model_fn(x, t, *rest):
            return apply_fn(params, x, t, *rest)

        return sample(
            method,
            model_fn,
            schedule,
            shape,
            key,
            y=y,
            batch_sharding=batch,
            **opts,
        )

    return jax.jit(fn, out_shardings=batch)


# --- Drawing a set of images: one path for --mode=sample, sample grids and evaluation ----------


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """The `sample` config section's sampler fields (the metric fields are evaluation's)."""

    method: str = "ddim"
    steps: int = 100  # model evaluations (respaced steps for ddpm/ddim)
    num_samples: int = 64
    batch_size: int = 256  # images per compiled call, split over the devices
    eta: float = 0.0  # DDIM's η
    clip_denoised: bool = True
    skip_type: str = "logSNR"  # DPM-Solver step spacing
    eps_scale_k: float = 0.0  # Epsilon Scaling: ε̂ / (k·i + b) for ddpm/ddim; (0, 1) is off
    eps_scale_b: float = 1.0

    RULES: ClassVar[dict[str, fields.Check]] = {
        "method": fields.one_of(*METHODS),
        "steps": fields.integer(1),
        "num_samples": fields.integer(1),
        "batch_size": fields.integer(1),
        "eta": fields.real(0),
        "clip_denoised": fields.boolean,
        "skip_type": fields.one_of(*SKIP_TYPES),
        "eps_scale_k": fields.real(),
        "eps_scale_b": fields.real(),
    }
    OTHERS: ClassVar[tuple[str, ...]] = ("metric", "inception_weights", "reference_stats")

    @classmethod
    def from_config(cls, cfg) -> SampleSpec:
        return cls(**fields.read(cfg, "sample", cls.RULES, others=cls.OTHERS))

    def replace(self, **changes) -> SampleSpec:
        return dataclasses.replace(self, **changes)

    @property
    def eps_scale(self) -> tuple[float, float] | None:
        """Epsilon Scaling's (k, b) when the method takes it and it is on; else None."""
        k_b = (self.eps_scale_k, self.eps_scale_b)
        return k_b if self.method in ("ddim", "ddpm") and k_b != (0.0, 1.0) else None

    def options(self, *, target: str, learn_sigma: bool) -> dict[str, Any]:
        """The keyword options of `sample(self.method, ...)` this spec sets."""
        opts: dict[str, Any] = {
            "steps": self.steps,
            "target": target,
            "learn_sigma": learn_sigma,
            "clip_denoised": self.clip_denoised,
        }
        if self.eps_scale:
            opts["eps_scale"] = self.eps_scale
        if self.method in ("dpm_solver", "dpm_solver++"):
            opts["skip_type"] = self.skip_type
        if self.method == "ddim":
            opts["eta"] = self.eta
        return opts


def draw_images(
    spec: SampleSpec,
    model: Any,
    params: Any,
    mesh: Mesh,
    schedule: schedules.Schedule,
    image_shape: tuple[int, int, int],
    key: jax.Array,
    *,
    target: str,
    learn_sigma: bool,
    num_classes: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`spec.num_samples` images of the Flax `model` at `params`, as uint8 [N, H, W, C].

    Chunks of `spec.batch_size` (rounded up to the mesh's `data` axis) go through one compiled
    `sharded_sampler`; chunk c draws with fold_in(key, c), and class-conditional models get labels
    uniform over `num_classes` from fold_in(that key, 1), so a set is reproducible and a longer
    set extends a shorter one. Returns (images, int32 labels [N], empty when unconditional);
    progress (rate, time left) is logged.
    """
    from ddpm_bs import progress  # noqa: PLC0415 (absl logging, only where images are drawn)

    n_data = mesh.shape["data"]
    batch = -(-min(spec.batch_size, spec.num_samples) // n_data) * n_data
    fn = _compiled_sampler(
        spec.method,
        model,
        mesh,
        (schedule.name, schedule.betas64),
        (batch, *image_shape),
        tuple(sorted(spec.options(target=target, learn_sigma=learn_sigma).items())),
    )
    images, labels = [], []
    with progress.Progress("sampling", total=spec.num_samples, unit="img") as bar:
        for chunk in range(-(-spec.num_samples // batch)):
            chunk_key = jax.random.fold_in(key, chunk)
            y = None
            if num_classes:
                y = jax.random.randint(jax.random.fold_in(chunk_key, 1), (batch,), 0, num_classes)
                labels.append(np.asarray(y))
            images.append(to_uint8(fn(params, chunk_key, y)))
            bar.update(min(batch, spec.num_samples - chunk * batch))
    images = np.concatenate(images)[: spec.num_samples]
    labels = np.concatenate(labels)[: spec.num_samples] if labels else np.zeros((0,), np.int32)
    return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _compiled_sampler(method, model, mesh, schedule_key, shape, opts):
    """One `sharded_sampler` per (model, mesh, schedule, shape, options), reused by grids and
    evaluations. `schedule_key` is (name, float64 β): a Schedule's arrays are not hashable."""
    name, betas = schedule_key

    def apply_fn(params, x, t, *y):
        return model.apply({"params": params}, x, t, *y, train=False)

    schedule = schedules.schedule_from_betas(np.asarray(betas), name)
    return sharded_sampler(method, apply_fn, mesh, schedule, shape, **dict(opts))


# --- Images ------------------------------------------------------------------------------------


def to_uint8(x: jax.Array) -> np.ndarray:
    """[−1, 1] float images → uint8 [0, 255] numpy (rounded as guided-diffusion does)."""
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows·(H+2), cols·(W+2), C] grid, 2-pixel gaps."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + 2), ncols * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = img
    return grid
