"""Train-step throughput: images/s, TFLOP/s, MFU, memory and compile time of `train.Trainer.step`.

The step is the real one (sampler, q_sample, hybrid loss, AdamW, EMA, metrics) on a synthetic
batch already on the devices, so the input pipeline is not measured. One JSON line per figure:

    {"bench": "train_step", "config": ..., "batch": ..., "dtype": ..., "img_per_s": ...,
     "tflops": ..., "mfu": ..., "gflop_per_img": ..., "peak_mem_gib": ...,
     "peak_mem_mib_per_img": ..., "compile_s": ..., ...}

`gflop_per_img` is the reference figure (55.6, the padded hand count) when the config builds
exactly the CIFAR-10 ADM network it was counted on, a `--gflop_per_img` given, and XLA's count of
the compiled step otherwise (`bench/flops.py`); `flop_source` says which ("reference", "flag",
"xla"), and `xla_gflop_per_img` is always XLA's (52.3 on the reference network: it skips conv taps
on zero padding). `tflops` and `mfu` use `gflop_per_img`. MFU is against the device's dense peak
for the dtype (known for H100/H200/A100; null elsewhere).

    python bench/train_step.py --config=configs/cifar10_adm.py --batch=128 --dtype=bfloat16
    python bench/train_step.py --config=configs/digits.py --batch=64
    python bench/train_step.py --smoke      # a few steps of a tiny config (what the test runs)

`--profile_dir=DIR` then traces `--profile_steps` more steps with `jax.profiler` into DIR
(open it in TensorBoard or xprof) and prints the 10 ops with the most time, then the 10 groups
of ops (pass and JAX primitive) with the most, one line each (`bench/xla_profile.py`):

    {"bench": "train_step_profile", "config": ..., "rank": 1, "op": "fusion.12",
     "what": "fusion[Loop] bf16[128,32,32,256] | jit(step)/.../conv_general_dilated",
     "ms_per_call": ..., "runs_per_call": ..., "share": ...}
    {"bench": "train_step_profile", ..., "rank": 1, "group": "backward conv_general_dilated",
     "ms_per_call": ..., "runs_per_call": ..., "share": ...}
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import flops  # noqa: E402  (bench/, first on the path when run as a script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import xla_profile  # noqa: E402  (bench/, first on the path when run as a script)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import default  # noqa: E402
from ddpm_bs import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10_adm.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
_GFLOP = flags.DEFINE_float(
    "gflop_per_img", None, "GFLOP per training image to use instead of bench/flops.py's."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny config, 2 steps, 1 repeat.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    None,
    "If set, trace --profile_steps steps here; print the top 10 ops and op groups.",
)
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 5, "Steps traced with --profile_dir.")

# Dense peak TFLOP/s by (device kind substring, dtype): vendor datasheets (SXM parts).
PEAKS = {
    ("H100", "bfloat16"): 989.0,
    ("H100", "float32"): 494.0,  # TF32 tensor cores, XLA's default for float32 matmuls on GPU
    ("H200", "bfloat16"): 989.0,
    ("H200", "float32"): 494.0,
    ("A100", "bfloat16"): 312.0,
    ("A100", "float32"): 156.0,
}


def main(argv):
    del argv
    config = _CONFIG.value
    name = Path(config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]).stem
    if _SMOKE.value:
        config = default.smoke(config)
    if _BATCH.value:
        config.train.batch_size = _BATCH.value
    if _DTYPE.value:
        config.model.dtype = _DTYPE.value
    steps, repeats = (2, 1) if _SMOKE.value else (_STEPS.value, _REPEATS.value)

    trainer = train.Trainer(config)
    state = trainer.init()
    b = config.train.batch_size
    image = jax.random.uniform(jax.random.key(0), (b, *trainer.image_shape), minval=-1, maxval=1)
    batch = jax.device_put(
        {"image": image, "label": jnp.zeros((b,), jnp.int32)}, trainer.batch_sharding
    )
    start = time.perf_counter()
    compiled = trainer.step.lower(state, batch, trainer.train_key).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_gflop = float(cost.get("flops", 0.0)) / b / 1e9 if cost else None

    state, metrics = compiled(state, batch, trainer.train_key)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch, trainer.train_key)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / steps)
    step_s = statistics.median(times)

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    gflop, flop_source = flops.gflop_per_img(config, xla_gflop)
    if _GFLOP.value:
        gflop, flop_source = _GFLOP.value, "flag"
    img_per_s = b / step_s
    tflops = img_per_s * gflop / 1e3 if gflop else None
    peak = next((v for (k, d), v in PEAKS.items() if k in kind and d == config.model.dtype), None)
    mem = device.memory_stats() or {}
    peak_bytes = mem.get("peak_bytes_in_use")
    if peak_bytes is None:  # CPU: XLA's static estimate of the step's buffers.
        ma = compiled.memory_analysis()
        peak_bytes = (
            ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            if ma is not None
            else None
        )
    record = {
        "bench": "train_step",
        "config": name + ("(smoke)" if _SMOKE.value else ""),
        "batch": b,
        "dtype": config.model.dtype,
        "devices": jax.device_count(),
        "img_per_s": round(img_per_s, 2),
        "step_ms": round(step_s * 1e3, 3),
        "gflop_per_img": round(gflop, 3) if gflop else None,
        "flop_source": flop_source,
        "xla_gflop_per_img": round(xla_gflop, 3) if xla_gflop else None,
        "tflops": round(tflops, 3) if tflops else None,
        "mfu": round(tflops / peak, 4) if (tflops and peak) else None,
        "peak_mem_gib": round(peak_bytes / 2**30, 3) if peak_bytes else None,
        "peak_mem_mib_per_img": round(peak_bytes / 2**20 / b, 2) if peak_bytes else None,
        "compile_s": round(compile_s, 2),
        "device": kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(json.dumps(record), flush=True)

    if _PROFILE_DIR.value:
        carry = {"state": state}

        def call():
            carry["state"], step_metrics = compiled(carry["state"], batch, trainer.train_key)
            return step_metrics

        for op in xla_profile.profile(
            call,
            calls=2 if _SMOKE.value else _PROFILE_STEPS.value,
            trace_dir=_PROFILE_DIR.value,
            hlo_text=compiled.as_text(),
        ):
            profiled = {"bench": "train_step_profile", "config": record["config"], "batch": b}
            print(json.dumps({**profiled, "dtype": record["dtype"], **op}), flush=True)


if __name__ == "__main__":
    app.run(main)
