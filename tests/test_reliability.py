"""Faults during training: non-finite steps, signals, damaged checkpoints, bad workdirs."""

import glob
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from support import assert_bitwise_equal, checkpoint_steps, host_copy, smoke_config

from ddpm_bs import checkpointing, data, train

# The loop, checkpoints and faults do not depend on the network: these run on a two-conv
# stand-in (support.ConvDenoiser). Bitwise resume of the U-Net itself is tested from the
# command line in test_processes.py.
pytestmark = pytest.mark.usefixtures("conv_denoiser")


@pytest.fixture
def nan_at_step(monkeypatch):
    """Makes the data pipeline's batch at the given (0-based) step all NaN."""

    def inject(bad_step):
        batch_at = data.Pipeline.batch_at

        def patched(self, step):
            batch = batch_at(self, step)
            if step == bad_step:
                batch["image"] = np.full_like(batch["image"], np.nan)
            return batch

        monkeypatch.setattr(data.Pipeline, "batch_at", patched)

    return inject


# --- Non-finite steps ----------------------------------------------------------------------


def test_a_non_finite_step_is_skipped_on_device_and_counted():
    config = smoke_config(optim__warmup_steps=0)  # (skipped steps do not advance the lr schedule)
    trainer = train.Trainer(config, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    loader = data.build(data.DataSpec.from_config(config.data), seed=0, global_batch_size=8)
    batch = loader.batch_at(0)
    batch["image"][3] = np.nan  # one bad example poisons the mean loss
    state = trainer.init()
    before = host_copy(state)
    state, metrics = trainer.step(state, jax.device_put(batch), trainer.train_key)
    after = host_copy(state)
    assert not np.isfinite(metrics["loss"])
    assert (int(after.step), int(after.skipped_steps), int(after.first_skipped_step)) == (1, 1, 1)
    for name in ("params", "ema_params", "opt_state"):
        assert_bitwise_equal(getattr(before, name), getattr(after, name))
    # A finite step afterwards is applied again, and the count stays.
    state, _ = trainer.step(state, jax.device_put(loader.batch_at(1)), trainer.train_key)
    after2 = host_copy(state)
    assert (int(after2.skipped_steps), int(after2.first_skipped_step)) == (1, 1)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(after2.params), jax.tree.leaves(after.params), strict=True)
    ]
    assert any(changed)  # the finite step is applied


def test_halt_on_a_non_finite_step_keeps_the_last_good_checkpoint(tmp_path, nan_at_step):
    nan_at_step(2)  # the batch of step 3 (1-based)
    config = smoke_config(train__num_steps=6, train__on_nonfinite="halt")
    with pytest.raises(
        train.TrainingHalted, match=r"not finite at step 3 .*last good checkpoint is step 2"
    ):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpoint_steps(tmp_path) == [2]


def test_skip_on_a_non_finite_step_trains_on_and_saves_finite_params(tmp_path, nan_at_step):
    nan_at_step(2)
    state = train.train_and_evaluate(smoke_config(train__num_steps=6), str(tmp_path))
    assert (int(state.step), int(state.skipped_steps), int(state.first_skipped_step)) == (6, 1, 3)
    assert checkpoint_steps(tmp_path) == [2, 4, 6]
    ckpt = checkpointing.Checkpoints(str(tmp_path), asynchronous=False)
    saved, _ = ckpt.restore(train.Trainer(smoke_config()).abstract_state)
    ckpt.close()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved.params))


# --- Signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch, signum):
    """(Resuming after SIGTERM is bitwise exact: tests/test_processes.py, from the CLI.)"""
    batch_at = data.Pipeline.batch_at

    def signal_once_at_step_5(self, step):
        if step == 5:  # the loader thread prepares batches ahead; the main thread gets the signal
            signal.raise_signal(signum)
        return batch_at(self, step)

    monkeypatch.setattr(data.Pipeline, "batch_at", signal_once_at_step_5)
    config = smoke_config(train__num_steps=50, train__checkpoint_every=0)  # no periodic checkpoints
    previous = signal.getsignal(signum)
    stopped = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert signal.getsignal(signum) is previous  # handlers are restored
    stop = int(stopped.step)
    assert 3 <= stop < 50 and checkpoint_steps(tmp_path / "b") == [stop]


# --- Damaged checkpoints ----------------------------------------------------------------------


def _damage(step_dir):
    """Truncates every array data file of a finalised checkpoint step to half its size."""
    files = [
        p
        for p in glob.glob(f"{step_dir}/state/**/*", recursive=True)
        if os.path.isfile(p) and "/d/" in p
    ]
    assert files, sorted(glob.glob(f"{step_dir}/**/*", recursive=True))
    for path in files:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)


def test_resume_is_bitwise_equal_even_past_a_damaged_checkpoint(tmp_path, caplog):
    config = smoke_config(train__num_steps=4, train__checkpoint_every=2)
    straight = host_copy(train.train_and_evaluate(config, str(tmp_path)))
    assert checkpoint_steps(tmp_path) == [2, 4]
    _damage(tmp_path / "checkpoints" / "4")

    with caplog.at_level("WARNING"):
        resumed = train.train_and_evaluate(config, str(tmp_path))
    assert any(
        "step 4" in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records
    )
    aside = glob.glob(str(tmp_path / "checkpoints_unreadable" / "4-*"))
    assert len(aside) == 1  # kept for inspection, not deleted
    assert checkpoint_steps(tmp_path) == [2, 4]  # step 4 trained again from step 2: params,
    assert_bitwise_equal(straight, resumed)  # EMA, Adam state, data position and keys resume


# --- Workdir --------------------------------------------------------------------------------


def test_an_unwritable_workdir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the workdir should be")
    with pytest.raises(train.SetupError, match=r"--workdir=.*cannot be written"):
        train.train_and_evaluate(smoke_config(), str(blocker / "run"))


def test_a_full_disk_is_reported_before_training(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10 << 20))
    with pytest.raises(train.SetupError, match=r"0\.01 GiB free.*room for two"):
        train.train_and_evaluate(smoke_config(), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_skipped_count_survives_a_resume(tmp_path, nan_at_step):
    nan_at_step(0)
    train.train_and_evaluate(smoke_config(train__num_steps=2), str(tmp_path))
    state = train.train_and_evaluate(smoke_config(train__num_steps=4), str(tmp_path))
    assert (int(state.skipped_steps), int(state.first_skipped_step)) == (1, 1)
    assert jnp.all(jnp.isfinite(jax.tree.leaves(state.params)[0]))
