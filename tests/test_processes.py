"""Real processes: `ddpm-bs` killed at random points and resumed, and 2-process training.

These start the command line as a user would (python -m ddpm_bs.main) and share one
persistent compilation cache, so each start after the first only pays imports and a cache
read. They are the slowest tests of the suite (about a minute each on a 2-core CPU).
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import smoke
from ddpm_bs import checkpointing, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 30
OVERRIDES = {
    "train.num_steps": NUM_STEPS,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "model.dropout": 0.1,
    "mesh.data": 1,  # one device: a checkpoint write is 3× faster than from 8 on this CPU
}


def _config(**extra):
    c = smoke.get_config()
    for dotted, value in {**OVERRIDES, **extra}.items():
        section, field = dotted.split(".")
        c[section][field] = value
    return c


def _env(cache_dir, devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


class Run:
    """One `ddpm-bs` process whose stderr is followed line by line in a thread."""

    def __init__(self, workdir, env, **extra):
        flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ddpm_bs.main", "--config=configs/smoke.py"]
            + [f"--workdir={workdir}", *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.last_step = 0  # the newest step whose metrics were logged
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"\] \[(\d+)\] grad_norm=", line)
            if m:
                self.last_step = int(m.group(1))

    def wait(self, timeout=480):
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def text(self):
        return "".join(self.lines)


def _restore(workdir, config):
    ckpt = checkpointing.Checkpoints(str(workdir), asynchronous=False)
    try:
        state, _ = ckpt.restore(train.Trainer(config).abstract_state)
    finally:
        ckpt.close()
    return jax.device_get(state)


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _writing(checkpoints):
    """Whether orbax is in the middle of writing a step (its temporary directory exists)."""
    try:
        return any("tmp" in name for name in os.listdir(checkpoints))
    except FileNotFoundError:
        return False


def test_killed_at_random_points_and_resumed_ends_bitwise_equal(tmp_path, cache_dir):
    workdir = tmp_path / "killed"
    env = _env(cache_dir, 8)  # as in this test process: XLA's CPU code depends on the count
    rng = np.random.default_rng(0)
    kills = {"sigkill": 0, "sigkill_during_write": 0, "sigterm": 0}
    plan = ["sigkill", "sigkill", "sigterm", "sigkill", "sigkill"]
    plan += ["sigkill_during_write"] * 3  # unless a kill above already landed inside a write
    for kind in [*plan, "finish"]:
        if kind == "sigkill_during_write" and kills[kind]:
            continue
        run = Run(workdir, env)
        if kind == "finish":
            assert run.wait() == 0, run.text()[-3000:]
            break
        resumed_at = max(_steps(workdir), default=0)
        target = resumed_at + int(rng.integers(1, 5))
        deadline = time.time() + 480
        while run.proc.poll() is None and time.time() < deadline:
            if kind == "sigkill_during_write":
                if run.last_step > resumed_at and _writing(workdir / "checkpoints"):
                    break
            elif run.last_step >= target:
                break
            time.sleep(0.002)
        assert run.proc.poll() is None, "the run finished before its kill point"
        if kind == "sigterm":
            run.proc.send_signal(signal.SIGTERM)
            assert run.wait() == 0, run.text()[-3000:]
            assert "Stopped by SIGTERM after step" in run.text()
            kills[kind] += 1
        else:
            in_write = _writing(workdir / "checkpoints")
            run.proc.kill()
            run.wait()
            kills["sigkill_during_write" if in_write else "sigkill"] += 1
    assert sum(kills.values()) >= 5 and kills["sigkill_during_write"] >= 1, kills
    assert max(_steps(workdir)) == NUM_STEPS

    config = _config()
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    _assert_bitwise_equal(jax.device_get(straight), _restore(workdir, config))


def _steps(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return [int(p.name) for p in directory.iterdir() if p.name.isdigit()]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, cache_dir, heartbeat_timeout=100, **extra):
    port = _free_port()
    return [
        Run(
            workdir,
            _env(
                cache_dir,
                4,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
                JAX_HEARTBEAT_TIMEOUT_SECONDS=str(heartbeat_timeout),
            ),
            **extra,
        )
        for i in range(2)
    ]


_GLOO_START = "Gloo context initialization failed"  # a peer compiled too slowly to connect


def _start_two(workdir, cache_dir, **kwargs):
    """Two processes that have both taken a step; one retry when gloo could not connect."""
    for attempt in range(2):
        runs = _two_processes(workdir / f"try{attempt}", cache_dir, **kwargs)
        deadline = time.time() + 480  # both compile first; slow while the suite's other worker runs
        while time.time() < deadline and all(r.proc.poll() is None for r in runs):
            if min(r.last_step for r in runs) >= 1:
                return runs
            time.sleep(0.05)
        if all(r.proc.poll() == 0 for r in runs):
            return runs  # a short run may finish between two polls
        for r in runs:
            r.proc.kill()
            r.wait()
        if not any(_GLOO_START in r.text() for r in runs):
            break
    raise AssertionError("\n".join(r.text()[-3000:] for r in runs))


def test_two_processes_train_like_one_and_stop_together(tmp_path, cache_dir):
    # 1. Same devices, data and keys as one process with 8 devices: the same parameters.
    runs = _start_two(tmp_path, cache_dir, **{"train.num_steps": 4, "mesh.data": -1})
    for run in runs:
        assert run.wait() == 0, run.text()[-3000:]
    assert "process 1 of 2" in runs[1].text()
    workdir = next(p for p in sorted(tmp_path.iterdir()) if (p / "checkpoints" / "4").is_dir())
    config = _config(**{"train.num_steps": 4, "mesh.data": -1})
    one = train.train_and_evaluate(config, str(tmp_path / "one"))
    two = _restore(workdir, config)
    assert int(two.step) == 4
    # Only the cross-process reduction order differs.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
        jax.device_get(one.params),
        two.params,
    )

    # 2. Killing one process stops the other with a message, not a hang.
    runs = _start_two(
        tmp_path / "kill",
        cache_dir,
        heartbeat_timeout=10,
        **{"train.num_steps": 100_000, "mesh.data": -1},
    )
    runs[1].proc.kill()
    start = time.time()
    rc = runs[0].wait(timeout=120)  # a hang would raise TimeoutExpired here
    assert rc != 0 and time.time() - start < 120
    text = runs[0].text()
    assert "another task died" in text and "stopped sending heartbeats" in text, text[-3000:]
