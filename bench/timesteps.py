"""Timestep-sampler throughput: draws per second for one jitted call of shape (n,).

Every sampler of `ddpm_bs.timesteps` at T = 1000 (bernoulli with the paper's t_δ/T = 0.8,
p = 0.8; the OT laws with K = 0.61, cosine), plus references written the obvious way:
`jax.random.randint`, Algorithm 1 with three draws (a uniform for the branch and one `randint`
per branch, selected), `jax.random.choice` on the pmf, and `jax.random.categorical` on its
logits (Gumbel-max, O(n·T): only for n ≤ 10⁵). Each figure is
the median of `--repeats` timed calls after a warm-up (compile) call, with the samplers
interleaved within each repeat so that machine load hits them alike. One JSON line per
sampler:

    {"bench": "timesteps", "sampler": ..., "n": ..., "draws_per_s": ...,
     "ratio_to_uniform": ..., "seconds": ..., "repeats": ..., "device": ..., "jax": ...}

`ratio_to_uniform` is the sampler's time per call over `uniform`'s (a cost ratio: 1.2 means
20% slower); `seconds_quartiles` is the spread of the timed calls. Usage:

    python bench/timesteps.py            # n = 10⁷, 7 repeats
    python bench/timesteps.py --n=128 --repeats=200   # a train step's batch
    python bench/timesteps.py --smoke    # n = 10⁴, 1 repeat (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddpm_bs import timesteps  # noqa: E402

NUM_TIMESTEPS = 1000
T_DELTA, P = 800, 0.8
DECAY_RATE = 0.61  # K fitted on digits 0 vs 1, cosine (experiments/REPORT.md)
MAX_CATEGORICAL = 100_000  # jax.random.categorical draws T Gumbels per sample


def _cases(n: int) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """Name → jitted function of a key that draws n timesteps."""
    shape = (n,)
    samplers = {
        "uniform": timesteps.uniform(NUM_TIMESTEPS),
        "bernoulli": timesteps.bernoulli(NUM_TIMESTEPS, T_DELTA, P),
        "piecewise": timesteps.piecewise(NUM_TIMESTEPS, (200, 800), (0.1, 0.7, 0.2)),
        "beta": timesteps.beta(NUM_TIMESTEPS, 2.0, 2.0),
        "lognormal": timesteps.lognormal(NUM_TIMESTEPS),
        "logit_normal": timesteps.logit_normal(NUM_TIMESTEPS),
        "ot_gap": timesteps.ot_gap(NUM_TIMESTEPS, DECAY_RATE),
        "ot_rate": timesteps.ot_rate(NUM_TIMESTEPS, DECAY_RATE),
    }
    cases = {
        name: jax.jit(lambda key, s=sampler: s(key, shape)) for name, sampler in samplers.items()
    }
    loss_aware = timesteps.loss_aware(NUM_TIMESTEPS)
    t = jnp.tile(jnp.arange(NUM_TIMESTEPS), loss_aware.history_per_term)
    losses = 1.0 + jnp.cos(t / 100.0) ** 2
    state = loss_aware.update(loss_aware.init_state(), t, losses)
    draw_loss_aware = jax.jit(lambda key, st: loss_aware(key, shape, st))
    cases["loss_aware"] = lambda key: draw_loss_aware(key, state)

    def randint(key):
        return jax.random.randint(key, shape, 0, NUM_TIMESTEPS, dtype=jnp.int32)

    def algorithm_1_literal(key):
        k_u, k_low, k_high = jax.random.split(key, 3)
        first = jax.random.uniform(k_u, shape) < P
        low = jax.random.randint(k_low, shape, 0, T_DELTA, dtype=jnp.int32)
        high = jax.random.randint(k_high, shape, T_DELTA - 1, NUM_TIMESTEPS, dtype=jnp.int32)
        return jnp.where(first, low, high)

    probs = samplers["lognormal"].probs

    def choice(key):
        return jax.random.choice(key, NUM_TIMESTEPS, shape, p=jnp.asarray(probs, jnp.float32))

    cases["reference_jax_random_randint"] = jax.jit(randint)
    cases["reference_algorithm_1_literal"] = jax.jit(algorithm_1_literal)
    cases["reference_jax_random_choice"] = jax.jit(choice)
    if n <= MAX_CATEGORICAL:
        logits = jnp.log(jnp.asarray(probs, jnp.float32))
        cases["reference_jax_random_categorical"] = jax.jit(
            lambda key: jax.random.categorical(key, logits, shape=shape)
        )
    return cases


def _quartiles(times: list[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles of `times` (both the one value for a single repeat)."""
    if len(times) < 2:
        return times[0], times[0]
    quartiles = statistics.quantiles(times, n=4)
    return quartiles[0], quartiles[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="n = 10⁴, 1 repeat")
    parser.add_argument("--n", type=int, default=10_000_000, help="draws per call")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per sampler")
    args = parser.parse_args(argv)
    n, repeats = (10_000, 1) if args.smoke else (args.n, args.repeats)

    cases = _cases(n)
    keys = [jax.random.key(i) for i in range(repeats + 1)]
    for draw in cases.values():  # compile and warm up
        draw(keys[0]).block_until_ready()
    seconds = {name: [] for name in cases}
    for key in keys[1:]:
        for name, draw in cases.items():
            start = time.perf_counter()
            draw(key).block_until_ready()
            seconds[name].append(time.perf_counter() - start)

    device = jax.devices()[0]
    uniform_s = statistics.median(seconds["uniform"])
    for name, times in seconds.items():
        median = statistics.median(times)
        record = {
            "bench": "timesteps",
            "sampler": name,
            "n": n,
            "draws_per_s": round(n / median),
            "ratio_to_uniform": round(median / uniform_s, 3),
            "seconds": round(median, 6),
            "seconds_quartiles": [round(q, 6) for q in _quartiles(times)],
            "repeats": repeats,
            "device": device.platform,
            "device_kind": device.device_kind,
            "jax": jax.__version__,
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
