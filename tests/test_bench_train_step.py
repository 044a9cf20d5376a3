"""The train-step benchmark runs in its smoke mode and prints one well-formed JSON record."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_train_step_smoke_prints_a_json_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, "bench/train_step.py", "--config=configs/digits.py", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert record["bench"] == "train_step" and record["config"] == "digits(smoke)"
    assert record["img_per_s"] > 0 and record["compile_s"] > 0
    assert record["gflop_per_img"] > 0 and record["peak_mem_gib"] > 0
    assert record["mfu"] is None  # no known peak for a CPU
