"""Solving the VE probability-flow ODE down a σ ladder, recording both of its trajectories.

Reproduces the trajectory analysis of Chen et al., "A Geometric Perspective on Diffusion
Models" (arXiv:2305.19947; "the paper" below). References to the paper name its findings
rather than section numbers, which differ between its versions.

The PF-ODE in EDM's form (Karras et al. 2022, Eq. 1 with σ(t) = t and ∇log p = (D − x)/σ²) is

    dx/dσ = (x − D(x; σ)) / σ,                                                        (1)

with D(x; σ) = E[y | x] the denoiser (`denoisers`). Integrating it from σ_max down to 0 gives
the *sampling trajectory* {x_σ}; the denoiser outputs along it form the *denoising trajectory*
{D(x_σ; σ)} (the paper's two trajectories); `solve` records both as a `Trajectory`.

* An Euler step of (1) from σ to σ' is x' = (σ'/σ)·x + (1 − σ'/σ)·D(x; σ), a convex
  combination of x and its mean shift; to σ' = 0 it lands on D(x; σ) exactly.
* In the coordinates z = x/σ, τ = 1/σ, Eq. (1) reads dz/dτ = D(σ·z; σ): the denoiser *is* the
  velocity. Every solver here (Heun, DPM-Solver-2, DPM-Solver++(2M)) takes, at each step, an
  Euler step with an effective denoiser D̄ built from finite differences of the denoising
  trajectory (the paper: "finite differences of the denoising trajectory yield second-order
  samplers"), see `effective_denoised`; `finite_difference_check` measures how exactly.

All arrays keep a leading batch axis: `x: [B, ...]`; `sigmas`: [N+1] strictly decreasing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_bs import sampling
from ddpm_bs.geometry import denoisers

SOLVERS = ("euler", "heun", "dpm2", "dpmpp_2m")


class Trajectory(NamedTuple):
    """One solve of the PF-ODE (1) for a batch.

    Attributes:
      sigmas: [N+1] the ladder σ_0 > σ_1 > … > σ_N ≥ 0.
      samples: [N+1, B, ...] the sampling trajectory, samples[i] = x at σ_i.
      denoised: [N, B, ...] the denoising trajectory, denoised[i] = D(samples[i]; σ_i).
      extra_denoised: [N, B, ...] the second denoiser call of step i: Heun's D at the Euler
        predictor (level σ_{i+1}), DPM-Solver-2's D at the log-midpoint σ_s = √(σ_i σ_{i+1});
        equal to denoised[i] where the step makes no second call (Euler, DPM-Solver++(2M),
        and every step to σ = 0).
    """

    sigmas: jax.Array
    samples: jax.Array
    denoised: jax.Array
    extra_denoised: jax.Array


def check_ladder(sigmas: Any) -> np.ndarray:
    """`sigmas` as float32 after checking it is a concrete ladder.

    Raises:
      ValueError: traced, not 1-D with ≥ 2 levels, not finite and > 0 (only the last may be
        0), or not strictly decreasing.
    """
    if isinstance(sigmas, jax.core.Tracer):
        raise ValueError(
            "sigmas must be concrete (numpy, or a constant closed over under jit), not a traced "
            "jit argument: the solvers' coefficients are computed from them on the host."
        )
    s = np.asarray(sigmas, np.float64)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"sigmas must be a 1-D ladder of ≥ 2 levels, got shape {s.shape}.")
    if not (np.all(np.isfinite(s)) and np.all(s[:-1] > 0) and s[-1] >= 0):
        raise ValueError(f"sigmas must be finite and > 0 (only the last may be 0), got {s}.")
    if not np.all(np.diff(s) < 0):
        raise ValueError(f"sigmas must be strictly decreasing, got {s}.")
    return np.asarray(sigmas, np.float32)


def euler_step(x: jax.Array, sigma, sigma_next, denoised: jax.Array) -> jax.Array:
    """EDM's Euler step of (1): x + (σ' − σ)·(x − D)/σ. sigma, sigma_next: scalars."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def euler_from_denoised(x: jax.Array, sigma, sigma_next, denoised: jax.Array) -> jax.Array:
    """The same Euler step written as mean shift: (σ'/σ)·x + (1 − σ'/σ)·D (as in the paper).

    Every solver in `SOLVERS` is this step with D replaced by `effective_denoised`.
    sigma, sigma_next: scalars, or arrays broadcastable against x with explicit axes.
    """
    ratio = sigma_next / sigma
    return ratio * x + (1.0 - ratio) * denoised


def solve(
    denoise: denoisers.Denoiser, x_init: jax.Array, sigmas: Any, method: str = "heun"
) -> Trajectory:
    """Integrates the PF-ODE (1) down a σ ladder, recording both trajectories.

    Methods (each one network call per step unless noted; the step to σ = 0 is always Euler):

    * 'euler': x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_i, d_i = (x_i − D_i)/σ_i.
    * 'heun': EDM Algorithm 1 without churn (Karras et al. 2022): Euler predictor x̃, then
      x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d̃)/2 with d̃ = (x̃ − D(x̃; σ_{i+1}))/σ_{i+1}
      (two calls).
    * 'dpm2': DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r = 1/2) in ε form with α = 1,
      λ = −log σ, h = λ_{i+1} − λ_i: u = x_i − σ_s·(e^{h/2} − 1)·ε_i at σ_s = √(σ_i σ_{i+1}),
      x_{i+1} = x_i − σ_{i+1}·(e^h − 1)·ε(u; σ_s), ε = (x − D)/σ (two calls).
    * 'dpmpp_2m': DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): x_{i+1} =
      (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·((1 + 1/2r)·D_i − (1/2r)·D_{i−1}), r = h_{i−1}/h;
      first-order at the first step.

    Each step is linear in x_i and the denoiser outputs, so every method is a
    `sampling.SolverPlan` (coefficients in float64 on the host) run by
    `sampling.run_plan_denoiser` in one `lax.scan`: 'euler' and 'heun' are
    `sampling.edm_ladder_plan`, the sampler `--mode=sample` runs as 'edm_euler'/'edm_heun'.

    Args:
      denoise: (x [B, ...], sigma [B]) -> D(x; σ) [B, ...].
      x_init: [B, ...] the state at σ_0 (e.g. σ_0·n, n ~ N(0, I)).
      sigmas: [N+1] strictly decreasing ladder, e.g. `schedules.edm_sigmas(N)` (ends at 0);
        concrete (numpy or a constant under jit), since the coefficients are computed from it.
      method: one of `SOLVERS`.

    Returns:
      A `Trajectory`.
    """
    if method not in SOLVERS:
        raise ValueError(f"method {method!r} is unknown; valid methods: {', '.join(SOLVERS)}.")
    ladder = check_ladder(sigmas)
    plan, levels = ladder_plan(np.asarray(ladder, np.float64), method)
    return solve_plan(denoise, x_init, plan, levels)


def solve_plan(
    denoise: denoisers.Denoiser, x_init: jax.Array, plan: sampling.SolverPlan, levels: Any
) -> Trajectory:
    """`solve` with its plan given (`ladder_plan`).

    The plan's coefficients (base_coef, pred_coef) and `levels` may be traced, so one compiled
    function serves every ladder whose plan has the same rows (timesteps, slots, rebase);
    those stay concrete.
    """
    x_init = jnp.asarray(x_init, jnp.float32)
    xs, preds = sampling.run_plan_denoiser(plan, denoise, levels, x_init)
    ends = np.flatnonzero(plan.rebase)  # the last row of each step
    starts = np.concatenate([[0], ends[:-1] + 1])  # its first row, where D(x_i; σ_i) is called
    return Trajectory(
        sigmas=jnp.asarray(levels, jnp.float32)[: ends.size + 1],  # the ladder's levels
        samples=jnp.concatenate([x_init[None], xs[ends]], axis=0),
        denoised=preds[starts],
        extra_denoised=preds[ends],
    )


def ladder_plan(sig: np.ndarray, method: str) -> tuple[sampling.SolverPlan, np.ndarray]:
    """`method`'s plan on the float64 ladder `sig` [N+1], and the σ of each level it names.

    Level i < N+1 is sig[i]; DPM-Solver-2's log-midpoint of step i, √(σ_i σ_{i+1}), is level
    N+1+i. Rows predict D (x0) and keep it in slot 0 (DPM-Solver-2's second call: slot 1;
    DPM-Solver++(2M): slots alternate so D_{i−1} is kept).
    """
    if method in ("euler", "heun"):
        return sampling.edm_ladder_plan(sig, method), sig
    n = sig.size - 1
    mids = np.sqrt(sig[:-1] * sig[1:])
    log_sig = np.log(np.where(sig > 0, sig, 1.0))
    rows = []  # (level, slot, base_coef, {slot: pred_coef}, rebase)
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        slot = i % 2 if method == "dpmpp_2m" else 0
        if s_next == 0:  # Euler to 0: x = D
            rows.append((i, slot, 0.0, {slot: 1.0}, True))
        elif method == "dpm2":  # u: Euler to σ_s; then x_{i+1} from D(x_i) and D(u; σ_s)
            m = mids[i]
            rows.append((i, 0, m / s, {0: 1.0 - m / s}, False))
            coef = {0: -(s - s_next) * (1.0 / m - 1.0 / s), 1: (s - s_next) / m}
            rows.append((n + 1 + i, 1, s_next / s, coef, True))
        else:  # dpmpp_2m
            w = 1.0 - s_next / s  # −(e^{−h} − 1)
            coef = {slot: w}
            if i > 0:
                r = (log_sig[i - 1] - log_sig[i]) / (log_sig[i] - log_sig[i + 1])
                coef = {slot: w * (1.0 + 0.5 / r), 1 - slot: -w * 0.5 / r}
            rows.append((i, slot, s_next / s, coef, True))
    pred_coef = np.zeros((len(rows), 3))
    for k, row in enumerate(rows):
        for slot, c in row[3].items():
            pred_coef[k, slot] = c
    plan = sampling.SolverPlan(
        timesteps=np.array([r[0] for r in rows], np.int32),
        in_scale=np.ones(len(rows)),
        slot=np.array([r[1] for r in rows], np.int32),
        base_coef=np.array([r[2] for r in rows], np.float64),
        pred_coef=pred_coef,
        rebase=np.array([r[4] for r in rows]),
        prediction="x0",
        init_scale=float(sig[0]),
    )
    return plan, np.concatenate([sig, mids])


def effective_denoised(traj: Trajectory, method: str) -> np.ndarray:
    """The D̄_i for which step i of `method` is the Euler/mean-shift step `euler_from_denoised`.

    With D_i = D(x_i; σ_i), D̃_i = traj.extra_denoised[i], λ = −log σ:

    * euler: D̄ = D_i.
    * heun: D̄ = D_i + σ_i/(2σ_{i+1})·(D̃_i − D_i), a forward difference of the denoising
      trajectory. It tends to the plain average (D_i + D̃_i)/2 as σ_{i+1}/σ_i → 1, and is the
      plain average exactly for the trapezoidal rule in (x/σ, 1/σ), where (1) is
      d(x/σ)/d(1/σ) = D; EDM's Heun applies the rule in (x, σ) instead.
    * dpm2: D̄ = D_i + e^{h/2}·(D(u; σ_s) − D_i), e^{h/2} = √(σ_i/σ_{i+1}).
    * dpmpp_2m: D̄ = D_i + (h_i/2)·(D_i − D_{i−1})/h_{i−1}: the denoising trajectory
      extrapolated linearly in log σ to the step's log-midpoint (a backward difference).

    Every step to σ = 0, and the first step of dpmpp_2m, uses D̄ = D_i. Computed in float64.

    Returns:
      [N, B, ...] float64.
    """
    if method not in SOLVERS:
        raise ValueError(f"method {method!r} is unknown; valid methods: {', '.join(SOLVERS)}.")
    sig = np.asarray(traj.sigmas, np.float64)
    d = np.asarray(traj.denoised, np.float64)
    extra = np.asarray(traj.extra_denoised, np.float64)
    n = d.shape[0]
    cur, nxt = sig[:-1], sig[1:]
    has_next = nxt > 0
    safe_next = np.where(has_next, nxt, cur)
    bshape = (n,) + (1,) * (d.ndim - 1)
    if method == "euler":
        coef, diff = np.zeros(n), np.zeros_like(d)
    elif method == "heun":
        coef, diff = cur / (2.0 * safe_next), extra - d
    elif method == "dpm2":
        coef, diff = np.sqrt(cur / safe_next), extra - d
    else:
        lam = -np.log(np.where(sig > 0, sig, 1.0))
        h = lam[1:] - lam[:-1]  # [N]; h[N−1] is junk when σ_N = 0 (masked below)
        coef = np.zeros(n)
        coef[1:] = 0.5 * h[1:] / h[:-1]
        diff = np.zeros_like(d)
        diff[1:] = d[1:] - d[:-1]
    coef = np.where(has_next, coef, 0.0)
    return d + coef.reshape(bshape) * diff


def finite_difference_check(traj: Trajectory, method: str) -> dict[str, Any]:
    """How exactly `method`'s own steps equal Euler steps with the finite-difference D̄.

    Recomputes every step as `euler_from_denoised(x_i, σ_i, σ_{i+1}, D̄_i)` in float64 from the
    recorded float32 trajectory and compares with the solver's float32 x_{i+1}.

    Returns:
      max_abs_error: max |x_{i+1}^{FD} − x_{i+1}^{solver}| over all steps and entries.
      max_rel_error: the same per step, divided by max |x_{i+1}|, maximised over steps.
      For 'heun' also average_form_max_rel_error: the same with D̄ = (D_i + D̃_i)/2, which is
        *not* an identity for EDM's Heun (see `effective_denoised`); it shrinks with the step.
    """
    sig = np.asarray(traj.sigmas, np.float64)
    x = np.asarray(traj.samples, np.float64)
    n = x.shape[0] - 1
    bshape = (n,) + (1,) * (x.ndim - 1)
    cur, nxt = sig[:-1].reshape(bshape), sig[1:].reshape(bshape)

    def errors(d_bar):
        fd = euler_from_denoised(x[:-1], cur, nxt, d_bar)
        err = np.abs(fd - x[1:]).reshape(n, -1).max(axis=1)
        scale = np.maximum(np.abs(x[1:]).reshape(n, -1).max(axis=1), 1e-30)
        return float(err.max()), float((err / scale).max())

    max_abs, max_rel = errors(effective_denoised(traj, method))
    out: dict[str, Any] = {"max_abs_error": max_abs, "max_rel_error": max_rel}
    if method == "heun":
        d = np.asarray(traj.denoised, np.float64)
        extra = np.asarray(traj.extra_denoised, np.float64)
        out["average_form_max_rel_error"] = errors(0.5 * (d + extra))[1]
    return out
