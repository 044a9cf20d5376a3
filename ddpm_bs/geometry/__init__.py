"""The geometry of the VE probability-flow ODE: optimal denoiser, mean shift, trajectories.

Reproduces the analysis of Chen et al., "A Geometric Perspective on Diffusion Models"
(arXiv:2305.19947) for the empirical data distribution and for a trained VP model read as a
VE denoiser:

* `denoisers`: D(x; σ): the optimal denoiser (= Gaussian mean shift), a Gaussian's, and a
  trained VP network's (`optimal_denoiser`, `mean_shift_step`, `vp_model_as_denoiser`);
* `trajectories`: the PF-ODE solved down a σ ladder with both trajectories recorded, and
  second-order steps as finite differences of the denoising trajectory (`solve`);
* `measures`: quasi-linearity, convergence, curvature of the trajectories;
* `ladders`: few-step σ ladders by dynamic programming over local errors (`dp_schedule`);
* `comparison`: those ladders against EDM's and uniform-in-t ones (`compare_schedules`);
* `job`: mode=geometry (`run_geometry`), writing `<workdir>/geometry/`.
"""

from ddpm_bs.geometry.comparison import compare_schedules
from ddpm_bs.geometry.denoisers import (
    DEFAULT_CHUNK,
    Denoiser,
    gaussian_denoiser,
    mean_shift_step,
    model_denoiser,
    model_params,
    optimal_denoiser,
    snap_sigmas,
    vp_model_as_denoiser,
)
from ddpm_bs.geometry.job import run_geometry
from ddpm_bs.geometry.ladders import (
    DP_SOLVERS,
    StepCosts,
    candidate_indices,
    dp_path,
    dp_schedule,
    nfe_to_steps,
    path_cost,
    snap_to_candidates,
    step_costs,
    steps_to_nfe,
    uniform_t_sigmas,
)
from ddpm_bs.geometry.measures import (
    convergence,
    curvature,
    denoiser_settles_at,
    nearest_data_distance,
    quasi_linearity,
)
from ddpm_bs.geometry.trajectories import (
    SOLVERS,
    Trajectory,
    effective_denoised,
    euler_from_denoised,
    euler_step,
    finite_difference_check,
    solve,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DP_SOLVERS",
    "SOLVERS",
    "Denoiser",
    "StepCosts",
    "Trajectory",
    "candidate_indices",
    "compare_schedules",
    "convergence",
    "curvature",
    "denoiser_settles_at",
    "dp_path",
    "dp_schedule",
    "effective_denoised",
    "euler_from_denoised",
    "euler_step",
    "finite_difference_check",
    "gaussian_denoiser",
    "mean_shift_step",
    "model_denoiser",
    "model_params",
    "nearest_data_distance",
    "nfe_to_steps",
    "optimal_denoiser",
    "path_cost",
    "quasi_linearity",
    "run_geometry",
    "snap_sigmas",
    "snap_to_candidates",
    "solve",
    "step_costs",
    "steps_to_nfe",
    "uniform_t_sigmas",
    "vp_model_as_denoiser",
]
