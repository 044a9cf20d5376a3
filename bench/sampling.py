"""Sampling throughput: images/s of DDIM and DPM-Solver++ on a config's U-Net, and minutes per 50k.

The model is `train.Trainer(config).model` with freshly initialised parameters (the weights do
not change the cost); sampling runs through `sampling.sharded_sampler` on the trainer's mesh,
compiled once, timed over repeats (median). One JSON line per method:

    {"bench": "sampling", "config": ..., "method": "ddim", "steps": 100, "nfe": 100,
     "batch": ..., "img_per_s": ..., "batch_s": ..., "min_per_50k": ..., "compile_s": ..., ...}

`nfe` is the number of U-Net evaluations per image; `min_per_50k` projects the time for the
50,000 samples of the FID protocol at this batch (compile excluded).

    python bench/sampling.py --config=configs/cifar10_adm.py --batch=1000 --dtype=bfloat16
    python bench/sampling.py --config=configs/digits.py --batch=64 --methods=ddim:100
    python bench/sampling.py --smoke      # tiny config, batch 8, 4 steps (what the test runs)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import default  # noqa: E402
from ddpm_bs import sampling, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10_adm.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 1000, "Images per sampling call (global, all devices).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
_METHODS = flags.DEFINE_list(
    "methods", ["ddim:100", "dpm_solver++:25"], "method:steps pairs (methods: sampling.METHODS)."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per method (the median is reported).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny config, batch 8, 4 steps, 1 repeat.")

NUM_FID_SAMPLES = 50_000


def nfe(method: str, num_timesteps: int, schedule: str, steps: int) -> int:
    """U-Net evaluations per image of `method` with `steps`."""
    if method in ("ddim", "ddpm"):
        return len(sampling.space_timesteps(num_timesteps, steps))
    if method == "dpm_solver":
        return sampling.dpm_solver_plan(schedule, num_timesteps, steps).nfe
    if method == "dpm_solver++":
        return sampling.dpm_solver_pp_plan(schedule, num_timesteps, steps).nfe
    return sampling.edm_plan(schedule, num_timesteps, steps, solver=method[4:]).nfe


def main(argv):
    del argv
    config = _CONFIG.value
    name = Path(config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]).stem
    batch, repeats = _BATCH.value, _REPEATS.value
    methods = [(m.split(":")[0], int(m.split(":")[1])) for m in _METHODS.value]
    if _SMOKE.value:
        config = default.smoke(config)
        batch, repeats = 8, 1
        methods = [(m, 4) for m, _ in methods]
    if _DTYPE.value:
        config.model.dtype = _DTYPE.value

    trainer = train.Trainer(config)
    params = trainer.init().params
    model, d = trainer.model, config.diffusion
    y = None
    if config.model.num_classes:
        y = jnp.arange(batch, dtype=jnp.int32) % config.model.num_classes
        y = jax.device_put(y, trainer.batch_sharding)

    def apply_fn(params, x, t, y=None):
        return model.apply({"params": params}, x, t, y, train=False)

    device = jax.devices()[0]
    for method, steps in methods:
        fn = sampling.sharded_sampler(
            method,
            apply_fn,
            trainer.mesh,
            d.schedule,
            d.num_timesteps,
            (batch, *trainer.image_shape),
            steps=steps,
            target=config.loss.target,
            learn_sigma=config.model.learn_sigma,
        )
        key = jax.random.key(0)
        start = time.perf_counter()
        compiled = fn.lower(params, key, y).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(params, key, y))  # warm-up
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, jax.random.key(r + 1), y))
            times.append(time.perf_counter() - start)
        batch_s = statistics.median(times)
        img_per_s = batch / batch_s
        record = {
            "bench": "sampling",
            "config": name + ("(smoke)" if _SMOKE.value else ""),
            "method": method,
            "steps": steps,
            "nfe": nfe(method, d.num_timesteps, d.schedule, steps),
            "batch": batch,
            "dtype": config.model.dtype,
            "devices": jax.device_count(),
            "img_per_s": round(img_per_s, 2),
            "batch_s": round(batch_s, 3),
            "min_per_50k": round(NUM_FID_SAMPLES / img_per_s / 60.0, 2),
            "compile_s": round(compile_s, 2),
            "device": getattr(device, "device_kind", device.platform),
            "jax": jax.__version__,
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    app.run(main)
