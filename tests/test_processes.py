"""Real processes: `ddpm-bs` killed at random points and resumed, and 2-process training.

These start the command line as a user would (python -m ddpm_bs.main) with the suite's
persistent compilation cache, so a start pays imports, a cache read and orbax start-up, not a
compile. They are the slowest tests of the suite.
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time

import jax
import numpy as np
from support import (
    ROOT,
    assert_bitwise_equal,
    checkpoint_steps,
    cli_command,
    cli_env,
    smoke_config,
)

from ddpm_bs import checkpointing, train

NUM_STEPS = 20
# One device: a checkpoint write is 3× faster than from 8 on this CPU.
OVERRIDES = {
    "train.num_steps": NUM_STEPS,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "mesh.data": 1,
}


class Run:
    """One `ddpm-bs` process whose stderr is followed line by line in a thread."""

    def __init__(self, workdir, env, **extra):
        self.proc = subprocess.Popen(
            cli_command(workdir, **{**OVERRIDES, **extra}),
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


def _writing(checkpoints):
    """Whether orbax is in the middle of writing a step (its temporary directory exists)."""
    try:
        return any("tmp" in name for name in os.listdir(checkpoints))
    except FileNotFoundError:
        return False


def test_killed_at_random_points_and_resumed_ends_bitwise_equal(tmp_path):
    workdir = tmp_path / "killed"
    env = cli_env(8)  # as in this test process: XLA's CPU code depends on the device count
    rng = np.random.default_rng(0)
    kills = {"sigkill": 0, "sigkill_during_write": 0, "sigterm": 0}
    # SIGKILL at a random step, SIGKILL while orbax writes, SIGTERM; then finish.
    for kind in ["sigkill", "sigkill_during_write", "sigterm", "finish"]:
        run = Run(workdir, env)
        if kind == "finish":
            assert run.wait() == 0, run.text()[-3000:]
            break
        resumed_at = max(checkpoint_steps(workdir), default=0)
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
    assert sum(kills.values()) == 3 and kills["sigkill_during_write"] >= 1, kills
    assert max(checkpoint_steps(workdir)) == NUM_STEPS

    config = smoke_config(**OVERRIDES)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert_bitwise_equal(jax.device_get(straight), _restore(workdir, config))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, heartbeat_timeout, **extra):
    port = _free_port()
    return [
        Run(
            workdir,
            cli_env(
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


def _start_two(workdir, heartbeat_timeout, **kwargs):
    """Two processes that have both taken a step; one retry when gloo could not connect."""
    for attempt in range(2):
        runs = _two_processes(workdir / f"try{attempt}", heartbeat_timeout, **kwargs)
        deadline = time.time() + 480  # both compile first; slow while the suite's other worker runs
        while time.time() < deadline and all(r.proc.poll() is None for r in runs):
            if min(r.last_step for r in runs) >= 1:
                return workdir / f"try{attempt}", runs
            time.sleep(0.05)
        for r in runs:
            r.proc.kill()
            r.wait()
        if not any(_GLOO_START in r.text() for r in runs):
            break
    raise AssertionError("\n".join(r.text()[-3000:] for r in runs))


def test_two_processes_train_like_one_and_a_killed_one_stops_the_other(tmp_path):
    # Two processes of 4 devices each train until both have written checkpoint 4; then one is
    # killed. The other must exit with a message (no hang), and checkpoint 4 must hold the
    # parameters one process with 8 devices reaches in 4 steps.
    workdir, runs = _start_two(
        tmp_path,
        heartbeat_timeout=10,
        **{"train.num_steps": 100_000, "train.checkpoint_every": 4, "mesh.data": -1},
    )
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "4").is_dir():  # renamed into place once complete
        assert time.time() < deadline and all(r.proc.poll() is None for r in runs), runs[0].text()
        time.sleep(0.01)
    runs[1].proc.kill()
    start = time.time()
    rc = runs[0].wait(timeout=120)  # a hang would raise TimeoutExpired here
    assert rc != 0 and time.time() - start < 120
    text = runs[0].text()
    assert "another task died" in text and "stopped sending heartbeats" in text, text[-3000:]
    assert "process 1 of 2" in runs[1].text()

    ckpt = checkpointing.Checkpoints(str(workdir), asynchronous=False)
    config = smoke_config(**{**OVERRIDES, "train.num_steps": 4, "mesh.data": -1})
    try:
        two, _ = ckpt.restore(train.Trainer(config).abstract_state, step=4)
    finally:
        ckpt.close()
    one = train.train_and_evaluate(config, str(tmp_path / "one"))
    assert int(two.step) == 4
    # Only the cross-process reduction order differs.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
        jax.device_get(one.params),
        jax.device_get(two.params),
    )
