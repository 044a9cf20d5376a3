"""`ddpm_bs/metric_log.py`: metrics reach the log, metrics.jsonl and TensorBoard with or without
TensorFlow (clu's metric writers import it; the default install lacks it), and W&B when asked."""

import io
import json
import logging
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image
from support import smoke_config

from ddpm_bs import artifacts, metric_log, train


def _hide(monkeypatch, *modules):
    """`import <module>` raises ImportError for each of `modules`, and clu's writer modules
    must load again."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    for name in list(sys.modules):  # loaded submodules would otherwise still import
        if name.startswith(("clu.metric_writers", "clu.periodic_actions")) or any(
            name.startswith(f"{module}.") for module in modules
        ):
            monkeypatch.delitem(sys.modules, name)
    if "clu" in sys.modules:  # `from clu import x` finds a loaded x as the package's attribute
        for name in ("metric_writers", "periodic_actions"):
            monkeypatch.delattr(sys.modules["clu"], name, raising=False)


@pytest.fixture(params=["tensorflow"])
def without_tensorflow(request, monkeypatch):
    """`import tensorflow` raises ImportError (or the module `request.param` names)."""
    _hide(monkeypatch, request.param)


_READER = """
import json, sys
sys.modules["tensorflow"] = None  # read as an install without TensorFlow does
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

events = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={"images": 0})
events.Reload()
tags = events.Tags()
try:
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
except KeyError:  # no hparams written
    content = b""
start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in events.Scalars(t)] for t in tags["scalars"]},
    "images": {
        t: [[e.step, e.height, e.width, e.encoded_image_string.hex()] for e in events.Images(t)]
        for t in tags["images"]
    },
    "hparams": hparams,
}))
"""


def _events(logdir):
    """What TensorBoard's own reader (EventAccumulator) loads from the event files in `logdir`:
    {"scalars": {tag: [[step, value]]}, "images": {tag: [[step, h, w, png hex]]}, "hparams":
    {name: value}}. In a fresh interpreter without TensorFlow: the reader caches which
    TensorFlow it found, which would leave this one unable to use clu's writers later."""
    out = subprocess.run(
        [sys.executable, "-c", _READER, str(logdir)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def _hparams_config():
    c = ml_collections.ConfigDict()
    c.optim = ml_collections.ConfigDict({"lr": 1e-4, "betas": (0.9, 0.99)})
    c.model = ml_collections.ConfigDict({"name": "unet", "learn_sigma": True, "num_classes": 0})
    c.sample = ml_collections.ConfigDict({"reference_stats": None})
    c.empty = ml_collections.ConfigDict()
    return c


def test_flat_hparams_names_sections_and_writes_non_scalars_as_json():
    assert metric_log.flat_hparams(_hparams_config()) == {
        "optim.lr": 1e-4,
        "optim.betas": "[0.9, 0.99]",
        "model.name": "unet",
        "model.learn_sigma": True,
        "model.num_classes": 0,
        "sample.reference_stats": "None",
    }


def test_flat_hparams_of_the_default_config_match_a_walk_of_its_sections():
    from configs import default

    config = default.get_config()
    expected = {}
    for key, value in config.items():  # top-level fields (seed) and one level of sections
        items = value.items() if isinstance(value, ml_collections.ConfigDict) else [(None, value)]
        for field, leaf in items:
            name = key if field is None else f"{key}.{field}"
            expected[name] = leaf if isinstance(leaf, (int, float, str, bool)) else str(leaf)
            if isinstance(leaf, (tuple, list)):
                expected[name] = "[" + ", ".join(map(str, leaf)) + "]"
    flat = metric_log.flat_hparams(config)
    assert list(flat.items()) == list(expected.items())
    assert flat["train.ema_rates"] == "[0.9999]" and len(flat) > 50


@pytest.mark.parametrize("without_tensorflow", ["tensorflow", "tensorboard"], indirect=True)
def test_without_tensorflow_tensorboard_gets_scalars_images_and_hparams(
    tmp_path, without_tensorflow, caplog
):
    grid = np.arange(8 * 12, dtype=np.uint8).reshape(1, 8, 12, 1) * 2
    with caplog.at_level(logging.INFO):
        writer, report = metric_log.open_writers(str(tmp_path), is_main=True, num_steps=1000)
        writer.write_hparams(metric_log.flat_hparams(_hparams_config()))
        writer.write_scalars(10, {"loss": 0.5, "grad_norm": np.float32(2.0)})
        writer.write_images(10, {"samples": grid})
        report(100, 1000.0)  # the first call only starts the clock
        report(150, 1010.0)  # before every_secs: nothing
        report(200, 1060.0)  # 100 steps in 60 s
        writer.close()
    assert "TensorBoard summaries are off" not in caplog.text
    assert "[10] grad_norm=2, loss=0.5" in caplog.text
    assert "Step 200 of 1000 (20.0%), 1.67 steps/s, 8.0 min left." in caplog.text
    lines = artifacts.read_jsonl(tmp_path / artifacts.METRICS_FILE)
    assert lines == [
        {"step": 10, "loss": 0.5, "grad_norm": 2.0},
        {"step": 200, "steps_per_sec": pytest.approx(100 / 60)},
    ]
    assert len(list(tmp_path.glob("events.out.tfevents*"))) == 1


def test_tensorboards_reader_loads_what_the_writer_wrote_without_tensorflow(
    tmp_path, without_tensorflow
):
    grid = (np.arange(8 * 12 * 3, dtype=np.uint8) % 251).reshape(1, 8, 12, 3)
    writer, _ = metric_log.open_writers(str(tmp_path), is_main=True, num_steps=10)
    writer.write_hparams(metric_log.flat_hparams(_hparams_config()))
    writer.write_scalars(2, {"loss": 0.5})
    writer.write_scalars(4, {"loss": 0.25, "eval/digits_fid": 3.0})
    writer.write_images(4, {"samples": grid})
    writer.close()
    events = _events(tmp_path)
    assert events["scalars"] == {"loss": [[2, 0.5], [4, 0.25]], "eval/digits_fid": [[4, 3.0]]}
    ((step, height, width, png),) = events["images"]["samples"]
    assert (step, height, width) == (4, 8, 12)
    decoded = np.asarray(Image.open(io.BytesIO(bytes.fromhex(png))))
    np.testing.assert_array_equal(decoded, grid[0])  # PNG: lossless
    assert events["hparams"] == {
        "optim.lr": pytest.approx(1e-4),
        "optim.betas": "[0.9, 0.99]",
        "model.name": "unet",
        "model.learn_sigma": True,
        "model.num_classes": 0.0,
        "sample.reference_stats": "None",
    }


def test_without_tensorflow_or_tensorboardx_scalars_go_to_the_log_and_metrics_jsonl(
    tmp_path, monkeypatch, caplog
):
    _hide(monkeypatch, "tensorflow", "tensorboardX")
    with caplog.at_level(logging.INFO):
        writer, _ = metric_log.open_writers(str(tmp_path), is_main=True, num_steps=1000)
        writer.write_hparams({"lr": 1e-4})
        writer.write_scalars(10, {"loss": 0.5})
        writer.write_images(10, {"samples": np.zeros((1, 8, 8, 3), np.uint8)})  # ignored
        writer.close()
    assert "TensorBoard summaries are off" in caplog.text
    assert "[10] loss=0.5" in caplog.text
    assert artifacts.read_jsonl(tmp_path / artifacts.METRICS_FILE) == [{"step": 10, "loss": 0.5}]
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_other_processes_only_log(tmp_path, without_tensorflow, caplog):
    with caplog.at_level(logging.INFO):
        writer, _ = metric_log.open_writers(str(tmp_path), is_main=False, num_steps=10)
        writer.write_scalars(1, {"loss": 1.0})
        writer.flush()
    assert "[1] loss=1" in caplog.text
    assert not list(tmp_path.iterdir())


@pytest.mark.usefixtures("conv_denoiser")
def test_training_runs_without_tensorflow(tmp_path, without_tensorflow):
    config = smoke_config(train__num_steps=4, train__log_every=2, mesh__data=1)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 4
    logged = artifacts.read_metrics(tmp_path)
    assert logged["loss"][:, 0].tolist() == [2.0, 4.0] and np.isfinite(logged["loss"]).all()
    events = _events(tmp_path)
    np.testing.assert_allclose(events["scalars"]["loss"], logged["loss"], rtol=1e-6)  # float32
    assert events["hparams"]["train.num_steps"] == 4


def test_with_tensorflow_tensorboard_gets_the_scalars_too(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("clu")
    writer, _ = metric_log.open_writers(str(tmp_path), is_main=True, num_steps=10)
    writer.write_scalars(3, {"loss": 0.25})
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents*"))
    assert artifacts.read_jsonl(tmp_path / artifacts.METRICS_FILE) == [{"step": 3, "loss": 0.25}]


# --------------------------------------------------------------------------------------------
# Weights & Biases


class FakeWandb(types.ModuleType):
    """The part of the wandb module WandbWriter uses; records what it is given."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.config, self.finished = [], [], {}, 0
        fake = self

        class Image:
            def __init__(self, array):
                self.array = np.asarray(array)

        class Config:
            def update(self, values, allow_val_change=False):
                fake.config.update(values)

        class Run:
            config = Config()

            def log(self, values, step=None):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        self.Image, self._run = Image, Run()

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self._run


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_gets_scalars_images_and_hparams_and_a_resumed_run_continues(
    tmp_path, fake_wandb, without_tensorflow
):
    workdir = str(tmp_path / "run_a")
    writer, _ = metric_log.open_writers(workdir, is_main=True, num_steps=10, wandb_project="p")
    writer.write_hparams({"optim.lr": 1e-4})
    writer.write_scalars(2, {"loss": np.float32(0.5)})
    writer.write_images(2, {"samples": np.full((1, 4, 6, 1), 7, np.uint8)})
    writer.close()
    (init,) = fake_wandb.inits
    assert init["project"] == "p" and init["name"] == "run_a"
    assert init["resume"] == "allow" and init["dir"] == workdir
    assert fake_wandb.config == {"optim.lr": 1e-4}
    (step, scalars), (image_step, images) = fake_wandb.logged
    assert (step, scalars) == (2, {"loss": 0.5}) and image_step == 2
    np.testing.assert_array_equal(images["samples"][0].array, np.full((4, 6), 7, np.uint8))
    assert fake_wandb.finished == 1
    metric_log.open_writers(workdir, is_main=True, num_steps=10, wandb_project="p")
    assert fake_wandb.inits[1]["id"] == init["id"]  # the run id kept in the workdir
    metric_log.open_writers(str(tmp_path / "run_b"), is_main=True, num_steps=10, wandb_project="p")
    assert fake_wandb.inits[2]["id"] != init["id"]


def test_wandb_is_not_imported_unless_asked_and_only_on_the_main_process(
    tmp_path, fake_wandb, without_tensorflow
):
    metric_log.open_writers(str(tmp_path), is_main=True, num_steps=10)
    metric_log.open_writers(str(tmp_path), is_main=False, num_steps=10, wandb_project="p")
    assert fake_wandb.inits == []


def test_check_writers_names_the_field_when_wandb_is_missing(monkeypatch):
    from configs import default

    config = default.get_config()
    metric_log.check_writers(config)  # None: off, nothing to check
    metric_log.check_writers(ml_collections.ConfigDict({"train": {}}))  # an older config
    config.train.wandb_project = "ddpm"
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(metric_log.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"train.wandb_project='ddpm' needs the wandb package"):
        metric_log.check_writers(config)
    config = ml_collections.ConfigDict({"train": {"wandb_project": 3}})
    with pytest.raises(ValueError, match="train.wandb_project must be a string"):
        metric_log.check_writers(config)
