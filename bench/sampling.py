"""Sampling throughput: images/s of DDIM and DPM-Solver++ on a config's U-Net, and minutes per 50k.

The model is `train.Trainer(config).model` with freshly initialised parameters (the weights do
not change the cost); sampling runs through `sampling.sharded_sampler` on the trainer's mesh,
compiled once, timed over repeats (median). One JSON line per method:

    {"bench": "sampling", "config": ..., "method": "ddim", "steps": 100, "nfe": 100,
     "batch": ..., "img_per_s": ..., "batch_s": ..., "min_per_50k": ..., "compile_s": ..., ...}

`nfe` is the number of U-Net evaluations per image; `min_per_50k` projects the time for the
50,000 samples of the FID protocol at this batch (compile excluded).

`--inception_batch=N` adds one line for the figure "Inception features/s": images/s through
`inception.features` (resize to 299², pool3 + spatial + logits) at batch N, on uint8 images of
the config's size, with random weights (they do not change the cost):

    {"bench": "inception_features", "config": ..., "batch": ..., "img_per_s": ...,
     "min_per_50k": ..., "compile_s": ..., ...}

    python bench/sampling.py --config=configs/cifar10_adm.py --batch=1000 --dtype=bfloat16
    python bench/sampling.py --config=configs/digits.py --batch=64 --methods=ddim:100
    python bench/sampling.py --config=configs/cifar10_adm.py --methods= --inception_batch=256
    python bench/sampling.py --smoke      # tiny config, batch 8, 4 steps (what the test runs)

`--profile_dir=DIR` traces one more call of each sampler with `jax.profiler` into DIR/<method>
and prints its 10 ops, then its 10 op groups, with the most time (`bench/xla_profile.py`), one
line each: `{"bench": "sampling_profile", "method": ..., "rank": ..., "op": ..., "what": ...,
"ms_per_call": ..., "share": ...}` (a group's line has "group" in place of "op" and "what").
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import xla_profile  # noqa: E402  (bench/, first on the path when run as a script)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import default  # noqa: E402
from ddpm_bs import inception, sampling, schedules, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10_adm.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 1000, "Images per sampling call (global, all devices).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
_METHODS = flags.DEFINE_list(
    "methods", ["ddim:100", "dpm_solver++:25"], "method:steps pairs (methods: sampling.METHODS)."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per method (the median is reported).")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny config, batch 8, 4 steps, 1 repeat; Inception (if asked) at batch 2."
)
_INCEPTION_BATCH = flags.DEFINE_integer(
    "inception_batch", 0, "If > 0, also time inception.features at this batch (one JSON line)."
)

_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    None,
    "If set, trace one call per method here; print its top 10 ops and op groups.",
)

NUM_FID_SAMPLES = 50_000


def nfe(method: str, schedule: schedules.Schedule, steps: int) -> int:
    """U-Net evaluations per image of `method` with `steps`."""
    if method in ("ddim", "ddpm"):
        return len(sampling.space_timesteps(schedule.num_timesteps, steps))
    if method == "dpm_solver":
        return sampling.dpm_solver_plan(schedule, steps).nfe
    if method == "dpm_solver++":
        return sampling.dpm_solver_pp_plan(schedule, steps).nfe
    return sampling.edm_plan(schedule, steps, solver=method[4:]).nfe


def bench_samplers(
    config, name: str, batch: int, repeats: int, methods: list[tuple[str, int]]
) -> None:
    """Prints one JSON line per (method, steps): the config's U-Net with fresh params."""
    trainer = train.Trainer(config)
    params = trainer.init().params
    model = trainer.model
    y = None
    if config.model.num_classes:
        y = jnp.arange(batch, dtype=jnp.int32) % config.model.num_classes
        y = jax.device_put(y, trainer.batch_sharding)

    def apply_fn(params, x, t, y=None):
        return model.apply({"params": params}, x, t, y, train=False)

    for method, steps in methods:
        fn = sampling.sharded_sampler(
            method,
            apply_fn,
            trainer.mesh,
            trainer.schedule,
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
            "config": name,
            "method": method,
            "steps": steps,
            "nfe": nfe(method, trainer.schedule, steps),
            "batch": batch,
            "dtype": config.model.dtype,
            "devices": jax.device_count(),
            "img_per_s": round(img_per_s, 2),
            "batch_s": round(batch_s, 3),
            "min_per_50k": round(NUM_FID_SAMPLES / img_per_s / 60.0, 2),
            "compile_s": round(compile_s, 2),
            "device": _device_kind(),
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        print(json.dumps(record), flush=True)
        if _PROFILE_DIR.value:
            for op in xla_profile.profile(
                functools.partial(compiled, params, key, y),
                calls=1,
                trace_dir=Path(_PROFILE_DIR.value) / f"{method}_{steps}",
                hlo_text=compiled.as_text(),
            ):
                profiled = {"bench": "sampling_profile", "config": name, "method": method}
                print(json.dumps({**profiled, "steps": steps, "batch": batch, **op}), flush=True)


def _device_kind() -> str:
    device = jax.devices()[0]
    return getattr(device, "device_kind", device.platform)


def inception_record(batch: int, repeats: int, image_shape: tuple[int, int, int]) -> dict:
    """Times `inception.features` on `batch` random uint8 images of `image_shape` (H, W, C)."""
    variables = jax.device_put(inception.random_params(0))
    images = np.random.default_rng(0).integers(0, 256, (batch, *image_shape), dtype=np.uint8)
    start = time.perf_counter()
    inception.features(images, variables, batch_size=batch)  # compiles resize and network
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        inception.features(images, variables, batch_size=batch)
        times.append(time.perf_counter() - start)
    batch_s = statistics.median(times)
    return {
        "batch": batch,
        "image_shape": list(image_shape),
        "img_per_s": round(batch / batch_s, 2),
        "batch_s": round(batch_s, 3),
        "min_per_50k": round(NUM_FID_SAMPLES / (batch / batch_s) / 60.0, 2),
        "compile_s": round(compile_s - batch_s, 2),  # the first call less one timed call
    }


def main(argv):
    del argv
    config = _CONFIG.value
    name = Path(config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]).stem
    batch, repeats = _BATCH.value, _REPEATS.value
    methods = [(m.split(":")[0], int(m.split(":")[1])) for m in _METHODS.value]
    inception_batch = _INCEPTION_BATCH.value
    if _SMOKE.value:
        config = default.smoke(config)
        batch, repeats = 8, 1
        methods = [(m, 4) for m, _ in methods]
        inception_batch = min(inception_batch, 2)
    if _DTYPE.value:
        config.model.dtype = _DTYPE.value

    name += "(smoke)" if _SMOKE.value else ""
    if methods:
        bench_samplers(config, name, batch, repeats, methods)
    if inception_batch > 0:
        image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
        record = {
            "bench": "inception_features",
            "config": name,
            **inception_record(inception_batch, repeats, image_shape),
            "devices": 1,  # features() runs on the default device
            "device": _device_kind(),
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    app.run(main)
