"""W₂ curve speed: `interval.w2_curve` against a POT `ot.sinkhorn2` loop on the same problems.

The data are two synthetic image sets of `--n` images of 32×32×3 (d = 3,072) in [−1, 1]
(tanh of low-rank Gaussian fields with different means), noised through the linear schedule
(T = 1000) at `--num_t` grid timesteps with one seed. For each estimator, every Sinkhorn
problem `w2_curve` solves is solved again by POT on the same noised points (the noise is
`interval.seed_noise`, converted to float64) with the same ε_t (taken from the curve), uniform
weights, `numItermax` = max_iterations and `stopThr` = threshold. POT's stopping error is the
L2 norm of the marginal error, checked every 10 iterations; ott's is the L1 norm, which is
larger, so POT gets the looser stopping rule. POT's time includes noising and `ot.dist` for
each problem; ours includes drawing the noise, the Gram matrices and every solve.

One JSON line per figure:

    {"bench": "interval", "estimator": "naive" | "debiased_baseline", "solves": ...,
     "seconds": ..., "seconds_with_compile": ..., "pot_seconds": ..., "speedup_vs_pot": ...,
     "max_rel_diff_transport": ..., "max_abs_diff_ratio": ..., ...}

`seconds` is a second (compiled) call, `seconds_with_compile` the first; `speedup_vs_pot` is
pot_seconds / seconds. `max_rel_diff_transport` is the largest |ours − POT|/POT over all
transport costs, `max_abs_diff_ratio` the largest difference of the normalised curves
W(t)/W(0). A third line, `"estimator": "reference_ott_per_t"`, times the obvious ott-jax use
(one jitted `PointCloud` Sinkhorn solve per t, no warm start) on the naive problems.

    python bench/interval.py            # 50 timesteps × 1,000 points × 3,072 dims
    python bench/interval.py --smoke    # 5 timesteps × 48 points × 48 dims (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import numpy as np  # noqa: E402
import ot  # noqa: E402
from ott.geometry import pointcloud  # noqa: E402
from ott.problems.linear import linear_problem  # noqa: E402
from ott.solvers.linear import sinkhorn  # noqa: E402

from ddpm_bs import interval, schedules  # noqa: E402

SCHEDULE, T = "linear", 1000
EPSILON_REL, THRESHOLD, MAX_ITERATIONS = 0.02, 1e-3, 1000


def synthetic_images(n: int, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two sets [n, side, side, 3] float32 in [−1, 1]: tanh of rank-32 fields, means ±0.3."""
    rng = np.random.default_rng(seed)
    d = side * side * 3
    basis = rng.normal(size=(32, d)) / math.sqrt(32)
    a = np.tanh(rng.normal(size=(n, 32)) @ basis + 0.3)
    b = np.tanh(rng.normal(size=(n, 32)) @ basis - 0.3)
    shape = (n, side, side, 3)
    return a.reshape(shape).astype(np.float32), b.reshape(shape).astype(np.float32)


def _ratio(estimate: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(estimate / estimate[0], 0.0))


def pot_curve(a, b, curve: interval.W2Curve, key) -> tuple[dict[str, np.ndarray], float, float]:
    """POT's transport costs for every pair of `curve` at its timesteps and ε: ({pair: [K]},
    seconds, mean iterations)."""
    x = {
        "a": a.reshape(len(a), -1).astype(np.float64),
        "b": b.reshape(len(b), -1).astype(np.float64),
    }
    noise = {
        k: np.asarray(v, np.float64)
        for k, v in interval.seed_noise(key, 0, len(a), len(b), x["a"].shape[1]).items()
    }
    alpha_bar = np.cumprod(1.0 - schedules.betas64(SCHEDULE, T))
    out = {p: np.zeros(len(curve.timesteps)) for p in curve.transport}
    iterations = []
    start = time.perf_counter()
    for k, t in enumerate(curve.timesteps):
        sa, sb = math.sqrt(alpha_bar[t]), math.sqrt(1.0 - alpha_bar[t])
        for p in curve.transport:
            xs, ys, xn, yn = interval.PAIRS[p]
            xt, yt = sa * x[xs] + sb * noise[xn], sa * x[ys] + sb * noise[yn]
            m = ot.dist(xt, yt)
            wa, wb = np.full(len(xt), 1.0 / len(xt)), np.full(len(yt), 1.0 / len(yt))
            value, log = ot.sinkhorn2(
                wa,
                wb,
                m,
                float(curve.epsilon[0, k]),
                numItermax=MAX_ITERATIONS,
                stopThr=THRESHOLD,
                log=True,
            )
            out[p][k] = float(value)
            iterations.append(log["niter"])
    return out, time.perf_counter() - start, float(np.mean(iterations))


@jax.jit
def _ott_solve(x, y, eps):
    solver = sinkhorn.Sinkhorn(threshold=THRESHOLD, max_iterations=MAX_ITERATIONS)
    geom = pointcloud.PointCloud(x, y, epsilon=eps)
    with jax.numpy_rank_promotion("allow"):  # ott broadcasts implicitly
        return solver(linear_problem.LinearProblem(geom)).primal_cost


def ott_per_t(a, b, curve: interval.W2Curve, key) -> tuple[np.ndarray, float]:
    """The obvious ott-jax use: one jitted PointCloud solve per t, default initialisation."""
    xa, xb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    noise = interval.seed_noise(key, 0, len(a), len(b), xa.shape[1])
    alpha_bar = np.cumprod(1.0 - schedules.betas64(SCHEDULE, T))
    out = np.zeros(len(curve.timesteps))
    start = time.perf_counter()
    for k, t in enumerate(curve.timesteps):
        sa, sb = float(math.sqrt(alpha_bar[t])), float(math.sqrt(1.0 - alpha_bar[t]))
        out[k] = _ott_solve(
            sa * xa + sb * noise["a"], sa * xb + sb * noise["b"], curve.epsilon[0, k]
        )
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="5 timesteps × 48 points × 48 dims")
    parser.add_argument("--n", type=int, default=1000, help="points per set")
    parser.add_argument("--num_t", type=int, default=50, help="grid timesteps")
    parser.add_argument("--side", type=int, default=32, help="image side (d = 3·side²)")
    args = parser.parse_args(argv)
    n, num_t, side = (48, 5, 4) if args.smoke else (args.n, args.num_t, args.side)

    load = os.getloadavg()[0]
    a, b = synthetic_images(n, side)
    key = jax.random.key(0)
    timesteps = interval.grid(T, num_t)
    device = jax.devices()[0]
    common = {
        "bench": "interval",
        "timesteps": len(timesteps),
        "n": n,
        "dim": 3 * side * side,
        "epsilon_rel": EPSILON_REL,
        "threshold": THRESHOLD,
        "device": device.platform,
        "device_kind": device.device_kind,
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_start": round(load, 2),
        "jax": jax.__version__,
        "pot": ot.__version__,
    }
    curves = {}
    for estimator in ("naive", "debiased_baseline"):
        kwargs = dict(
            schedule=SCHEDULE,
            num_timesteps=T,
            timesteps=timesteps,
            key=key,
            num_seeds=1,
            estimator=estimator,
            epsilon_rel=EPSILON_REL,
            threshold=THRESHOLD,
            max_iterations=MAX_ITERATIONS,
        )
        cold = interval.w2_curve(a, b, **kwargs)
        curve = interval.w2_curve(a, b, **kwargs)
        curves[estimator] = curve
        pot, pot_seconds, pot_iterations = pot_curve(a, b, curve, key)
        ours = {p: v[0] for p, v in curve.transport.items()}
        rel = max(float(np.max(np.abs(ours[p] - pot[p]) / np.abs(pot[p]))) for p in pot)
        if estimator == "naive":
            pot_estimate = pot["ab"]
        else:
            pot_estimate = pot["ab"] - 0.5 * (pot["aa_prime"] + pot["bb_prime"])
        record = {
            **common,
            "estimator": estimator,
            "solves": len(timesteps) * len(pot),
            "seconds": round(curve.seconds, 3),
            "seconds_with_compile": round(cold.seconds, 3),
            "pot_seconds": round(pot_seconds, 3),
            "speedup_vs_pot": round(pot_seconds / curve.seconds, 2),
            "max_rel_diff_transport": float(f"{rel:.3g}"),
            "max_abs_diff_ratio": float(
                f"{np.max(np.abs(curve.ratio - _ratio(pot_estimate))):.3g}"
            ),
            "iterations_mean": round(float(np.mean([v for v in curve.iterations.values()])), 2),
            "pot_iterations_mean": round(pot_iterations, 2),
            "all_converged": bool(all(v.all() for v in curve.converged.values())),
        }
        print(json.dumps(record), flush=True)

    naive = curves["naive"]
    ott_per_t(a, b, naive, key)  # compile
    reference, seconds = ott_per_t(a, b, naive, key)
    ours = naive.transport["ab"][0]
    record = {
        **common,
        "estimator": "reference_ott_per_t",
        "solves": len(timesteps),
        "seconds": round(seconds, 3),
        "speedup_of_w2_curve": round(seconds / naive.seconds, 2),
        "max_rel_diff_transport": float(f"{np.max(np.abs(reference - ours) / ours):.3g}"),
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
