"""checkpointing.Checkpoints: which steps survive (`train.keep_checkpoints`, `train.keep_period`)."""

import numpy as np
import pytest

from ddpm_bs import checkpointing


def _save_steps(workdir, steps, **options):
    ckpt = checkpointing.Checkpoints(str(workdir), asynchronous=False, **options)
    try:
        for step in steps:
            ckpt.save(step, {"w": np.full((2,), step, np.float32)}, {"step": step})
        return sorted(ckpt.manager.all_steps())
    finally:
        ckpt.close()


def test_keep_period_keeps_every_multiple_beside_the_newest(tmp_path):
    # The newest 2 of 1..10, and the multiples of 4 for good; none beyond the newest without it.
    assert _save_steps(tmp_path / "a", range(1, 11), keep=2, keep_period=4) == [4, 8, 9, 10]
    assert _save_steps(tmp_path / "b", range(1, 11), keep=2) == [9, 10]
    # A resumed run keeps them too, and restores the newest step.
    assert _save_steps(tmp_path / "a", [11, 12, 13], keep=2, keep_period=4) == [4, 8, 12, 13]
    ckpt = checkpointing.Checkpoints(str(tmp_path / "a"), asynchronous=False, keep_period=4)
    try:
        state, data_state = ckpt.restore({"w": np.zeros((2,), np.float32)})
    finally:
        ckpt.close()
    assert data_state == {"step": 13} and state["w"].tolist() == [13.0, 13.0]


def test_keep_period_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match=r"train.keep_period=-1: must be ≥ 0"):
        checkpointing.Checkpoints(str(tmp_path), keep_period=-1)
