"""Test setup: 8 fake CPU devices and strict rank promotion, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)

# Trainers in different tests compile identical programs; a per-session persistent cache
# compiles each once (the CPU compile of a U-Net step takes tens of seconds).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# pytest-xdist workers (children of the controller) share the controller's cache directory;
# the controller, which outlives them, removes it.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_CACHE_DIR = os.path.join(
    tempfile.gettempdir(), f"ddpm_bs_jax_cache_{os.getppid() if _WORKER else os.getpid()}"
)
os.makedirs(_CACHE_DIR, exist_ok=True)
if not _WORKER:
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture
def conv_denoiser(monkeypatch):
    """Trainers built in this test use support.ConvDenoiser instead of the U-Net."""
    from support import ConvDenoiser

    from ddpm_bs import state

    monkeypatch.setattr(
        state, "build_model", lambda config: ConvDenoiser(dropout=config.model.dropout)
    )


@pytest.fixture
def run_bench():
    """Runs `python bench/<script> <args>` from the repo root on one CPU device.

    Returns the JSON records it printed, one per line, after asserting it exited 0.
    """
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]

    def run(script, *args, timeout=600):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
        result = subprocess.run(
            [sys.executable, f"bench/{script}", *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    return run
