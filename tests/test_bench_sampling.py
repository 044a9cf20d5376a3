"""The sampling benchmark runs in its smoke mode and prints one well-formed JSON line per method."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_sampling_smoke_prints_a_json_line_per_method():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, "bench/sampling.py", "--config=configs/digits.py", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in records] == ["ddim", "dpm_solver++"]
    for r in records:
        assert r["bench"] == "sampling" and r["config"] == "digits(smoke)"
        assert r["batch"] == 8 and r["steps"] == 4 and r["nfe"] == 4
        assert r["img_per_s"] > 0 and r["min_per_50k"] > 0 and r["compile_s"] > 0
