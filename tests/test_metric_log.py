"""`ddpm_bs/metric_log.py`: metrics reach the log and metrics.jsonl with or without TensorFlow
(clu's metric writers import it; a JAX-only GPU image lacks it)."""

import logging
import sys

import numpy as np
import pytest
from support import smoke_config

from ddpm_bs import artifacts, metric_log, train


@pytest.fixture(params=["tensorflow"])
def without_tensorflow(request, monkeypatch):
    """`import tensorflow` raises ImportError (or the module `request.param` names), and clu's
    writer modules must load again."""
    monkeypatch.setitem(sys.modules, request.param, None)
    for name in list(sys.modules):  # loaded submodules would otherwise still import
        if name.startswith(("clu.metric_writers", "clu.periodic_actions", f"{request.param}.")):
            monkeypatch.delitem(sys.modules, name)
    if "clu" in sys.modules:  # `from clu import x` finds a loaded x as the package's attribute
        for name in ("metric_writers", "periodic_actions"):
            monkeypatch.delattr(sys.modules["clu"], name, raising=False)


@pytest.mark.parametrize("without_tensorflow", ["tensorflow", "tensorboard"], indirect=True)
def test_without_tensorflow_scalars_go_to_the_log_and_metrics_jsonl(
    tmp_path, without_tensorflow, caplog
):
    with caplog.at_level(logging.INFO):
        writer, report = metric_log.open_writers(str(tmp_path), is_main=True, num_steps=1000)
        writer.write_hparams({"lr": 1e-4})
        writer.write_scalars(10, {"loss": 0.5, "grad_norm": np.float32(2.0)})
        writer.write_images(10, {"samples": np.zeros((1, 8, 8, 3), np.uint8)})  # ignored
        report(100, 1000.0)  # the first call only starts the clock
        report(150, 1010.0)  # before every_secs: nothing
        report(200, 1060.0)  # 100 steps in 60 s
        writer.flush()
    assert "TensorBoard summaries are off" in caplog.text
    assert "[10] grad_norm=2, loss=0.5" in caplog.text
    assert "Step 200 of 1000 (20.0%), 1.67 steps/s, 8.0 min left." in caplog.text
    lines = artifacts.read_jsonl(tmp_path / artifacts.METRICS_FILE)
    assert lines == [
        {"step": 10, "loss": 0.5, "grad_norm": 2.0},
        {"step": 200, "steps_per_sec": pytest.approx(100 / 60)},
    ]
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_other_processes_only_log(tmp_path, without_tensorflow, caplog):
    with caplog.at_level(logging.INFO):
        writer, _ = metric_log.open_writers(str(tmp_path), is_main=False, num_steps=10)
        writer.write_scalars(1, {"loss": 1.0})
        writer.flush()
    assert "[1] loss=1" in caplog.text
    assert not (tmp_path / artifacts.METRICS_FILE).exists()


@pytest.mark.usefixtures("conv_denoiser")
def test_training_runs_without_tensorflow(tmp_path, without_tensorflow, caplog):
    config = smoke_config(train__num_steps=4, train__log_every=2, mesh__data=1)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4
    logged = artifacts.read_metrics(tmp_path)
    assert logged["loss"][:, 0].tolist() == [2.0, 4.0] and np.isfinite(logged["loss"]).all()
    assert "TensorBoard summaries are off" in caplog.text
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_with_tensorflow_tensorboard_gets_the_scalars_too(tmp_path):
    pytest.importorskip("tensorflow")
    writer, _ = metric_log.open_writers(str(tmp_path), is_main=True, num_steps=10)
    writer.write_scalars(3, {"loss": 0.25})
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents*"))
    assert artifacts.read_jsonl(tmp_path / artifacts.METRICS_FILE) == [{"step": 3, "loss": 0.25}]
