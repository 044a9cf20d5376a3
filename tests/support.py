"""Helpers the training tests share (imported as `support`; conftest.py sets up JAX and the
`conv_denoiser` fixture that swaps the U-Net for `ConvDenoiser`).

The suite's training tests use one small config, `smoke_config()`, on either all 8 devices
or one (`mesh.data=1`), so that their train steps are the same two XLA programs: the
persistent compilation cache then compiles each once for the whole suite, including the
command-line runs started by `cli_env`, which share the cache directory.
"""

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from configs import smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ConvDenoiser(nn.Module):
    """A two-conv stand-in for the U-Net, for tests of what surrounds the network (the loop,
    checkpoints, faults, sweeps): it compiles in about a second where the U-Net's train step
    takes tens, and its 6 arrays checkpoint far faster than the U-Net's 144."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, t, y=None, *, train):
        del y
        h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(jnp.sin(t[:, None] / 100.0))[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


def smoke_config(**overrides):
    """configs/smoke.py (digits) with dropout on; overrides as train__num_steps=4 (or dotted)."""
    c = smoke.get_config()
    c.model.dropout = 0.1  # resume and sharding tests then cover the dropout keys too
    for name, value in overrides.items():
        section, field = name.replace("__", ".").split(".")
        c[section][field] = value
    return c


def cli_flags(**overrides):
    """`smoke_config(**overrides)` as ddpm-bs flags (after --config=configs/smoke.py)."""
    overrides = {k.replace("__", "."): v for k, v in overrides.items()}
    return [f"--config.{k}={v}" for k, v in {"model.dropout": 0.1, **overrides}.items()]


def cli_command(workdir, **overrides):
    return [
        sys.executable, "-m", "ddpm_bs.main", "--config=configs/smoke.py",
        f"--workdir={workdir}", *cli_flags(**overrides),
    ]  # fmt: skip


def cli_env(devices=8, **extra):
    """Environment for a `ddpm-bs` subprocess: CPU, `devices` fake devices, this suite's cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(
            jax.config.jax_persistent_cache_min_compile_time_secs
        ),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def checkpoint_steps(workdir):
    """The finalised checkpoint steps in `<workdir>/checkpoints`, ascending."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def host_copy(tree):
    """Host copies (device_get may alias CPU buffers that a later donated step overwrites)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
