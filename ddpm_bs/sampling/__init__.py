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

Modules, one job each:
  ancestral  respacing, DDPM and DDIM (with Epsilon Scaling), and the helpers all share;
  solvers    the deterministic solvers as `SolverPlan`s (DPM-Solver, DPM-Solver++, EDM);
  draw       `sample` (dispatch on the name), `sharded_sampler`, `SampleSpec` and
             `draw_images` (one path for --mode=sample, sample grids and evaluations).
"""

from ddpm_bs.sampling.ancestral import (
    ModelFn,
    Respacing,
    ddim_sample,
    ddpm_sample,
    respace,
    space_timesteps,
)
from ddpm_bs.sampling.draw import (
    METHODS,
    SampleSpec,
    draw_images,
    image_grid,
    sample,
    sharded_sampler,
    to_uint8,
)
from ddpm_bs.sampling.solvers import (
    SKIP_TYPES,
    SolverPlan,
    dpm_solver_plan,
    dpm_solver_pp_plan,
    dpm_solver_pp_sample,
    dpm_solver_sample,
    edm_ladder_plan,
    edm_plan,
    edm_sample,
    run_plan,
    run_plan_denoiser,
)

__all__ = [
    "METHODS",
    "SKIP_TYPES",
    "ModelFn",
    "Respacing",
    "SampleSpec",
    "SolverPlan",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_plan",
    "dpm_solver_pp_plan",
    "dpm_solver_pp_sample",
    "dpm_solver_sample",
    "draw_images",
    "edm_ladder_plan",
    "edm_plan",
    "edm_sample",
    "image_grid",
    "respace",
    "run_plan",
    "run_plan_denoiser",
    "sample",
    "sharded_sampler",
    "space_timesteps",
    "to_uint8",
]
