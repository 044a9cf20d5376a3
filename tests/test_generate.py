"""Modes `sample` and `eval`: images from a workdir's checkpoint, written as .npz and a grid
PNG, and their scores; in a local or a remote (gs://) workdir."""

import importlib
import logging
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path
from support import smoke_config

from ddpm_bs import artifacts, generate, train


def _config():
    c = smoke_config()  # the suite's shared train step: compiled once
    c.train.num_steps = 2
    c.sample.num_samples = 10
    c.sample.batch_size = 8  # two chunks; the last is trimmed
    c.sample.steps = 3
    return c


def test_sample_mode_needs_a_checkpoint_and_a_known_method(tmp_path):
    config = _config()
    with pytest.raises(FileNotFoundError, match="no checkpoints/ to sample from"):
        generate.run_sample(config, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run --mode=sample"):
        generate.run_eval(config, str(tmp_path))
    config.sample.method = "euler_maruyama"
    with pytest.raises(ValueError, match="sample.method='euler_maruyama'.*ddim"):
        generate.run_sample(config, str(tmp_path))


# --------------------------------------------------------------------------------------------
# Remote workdirs


class _BucketsInADirectory(LocalFileSystem):
    """A stand-in for Google Cloud Storage: gs://<bucket>/<key> is the file <root>/<bucket>/<key>.

    Only URL-style paths reach it (through etils.epath's fsspec backend), so a file that code
    writes with os/open under a gs:// path lands in the working directory instead, not here."""

    root = ""
    protocol = ("gs", "gcs")
    cachable = False

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = os.path.join(cls.root, path[len(prefix) :])
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):  # keys, as GCS lists them (epath adds the gs://)
        return [os.path.relpath(p, self.root) for p in super().glob(path, **kwargs)]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs:// paths are served from tmp_path/gcs through epath; returns that directory. The
    working directory is an empty tmp_path/cwd, where local writes of gs:// paths would land."""
    root = tmp_path / "gcs"
    root.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("EPATH_USE_TF", "false")  # epath's fsspec backend, also with TensorFlow
    monkeypatch.setattr(_BucketsInADirectory, "root", str(root))
    registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry: a view
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, _BucketsInADirectory)
    caches = (epath_gpath._is_tf_installed, epath_backend.fsspec_backend._get_filesystem)
    for cache in caches:  # epath decides (and caches) which backend and filesystem serve gs://
        cache.cache_clear()
    yield root
    for cache in caches:
        cache.cache_clear()


def test_sample_mode_writes_reproducible_images_in_local_and_remote_workdirs(
    tmp_path, conv_denoiser, fake_gcs, monkeypatch, caplog
):
    config = _config()
    local = tmp_path / "local"
    train.train_and_evaluate(config, str(local))
    config.sample.method = "dpm_solver++"
    with caplog.at_level(logging.INFO):
        path = generate.run_sample(config, str(local))
    assert "sampling: done, 10/10 img (100.0%)" in caplog.text
    images = np.load(path)["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert path.endswith("dpm_solver++3_step00000002.npz")
    assert (local / "samples" / "dpm_solver++3_step00000002.png").is_file()
    again = np.load(generate.run_sample(config, str(local)))["images"]
    np.testing.assert_array_equal(images, again)
    result = generate.run_eval(config, str(local))  # the newest .npz: the one just written
    assert result["num_samples"] == 10 and result["digits_fid"] > 0
    assert (local / "eval.jsonl").read_text().count("digits_fid") == 1

    # The same in gs://bucket/run. orbax reads gs:// arrays with tensorstore's own GCS driver,
    # which the stand-in does not serve: the checkpoint comes from the local run.
    with pytest.raises(FileNotFoundError, match="gs://bucket/run has no checkpoints/"):
        generate.run_sample(config, "gs://bucket/run")
    restore = generate.restore_ema_params
    monkeypatch.setattr(generate, "restore_ema_params", lambda c, _, *a: restore(c, str(local), *a))
    remote = "gs://bucket/run/samples/dpm_solver++3_step00000002.npz"
    assert generate.run_sample(config, "gs://bucket/run") == remote
    stored = fake_gcs / "bucket" / "run"
    assert sorted(p.name for p in (stored / "samples").iterdir()) == [
        "dpm_solver++3_step00000002.npz",
        "dpm_solver++3_step00000002.png",  # and no .tmp left behind
    ]
    np.testing.assert_array_equal(
        np.load(stored / "samples" / "dpm_solver++3_step00000002.npz")["images"], images
    )
    remote_result = generate.run_eval(config, "gs://bucket/run")
    assert remote_result == result
    assert artifacts.read_jsonl(stored / "eval.jsonl") == [result]
    assert not list((tmp_path / "cwd").iterdir())  # nothing went through the local filesystem
