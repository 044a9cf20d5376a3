"""Mode `sample`: images from a workdir's checkpoint, written as .npz and a grid PNG."""

import numpy as np
import pytest
from support import smoke_config

from ddpm_bs import generate, train


def _config():
    c = smoke_config()  # the suite's shared train step: compiled once
    c.train.num_steps = 2
    c.sample.num_samples = 10
    c.sample.batch_size = 8  # two chunks; the last is trimmed
    c.sample.steps = 3
    return c


def test_sample_mode_writes_reproducible_images(tmp_path, conv_denoiser):
    config = _config()
    train.train_and_evaluate(config, str(tmp_path))
    config.sample.method = "dpm_solver++"
    path = generate.run_sample(config, str(tmp_path))
    images = np.load(path)["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert path.endswith("dpm_solver++3_step00000002.npz")
    assert (tmp_path / "samples" / "dpm_solver++3_step00000002.png").is_file()
    again = np.load(generate.run_sample(config, str(tmp_path)))["images"]
    np.testing.assert_array_equal(images, again)
    result = generate.run_eval(config, str(tmp_path))  # the newest .npz: the one just written
    assert result["num_samples"] == 10 and result["digits_fid"] > 0
    assert (tmp_path / "eval.jsonl").read_text().count("digits_fid") == 1


def test_sample_mode_needs_a_checkpoint_and_a_known_method(tmp_path):
    config = _config()
    with pytest.raises(FileNotFoundError, match="no checkpoints/ to sample from"):
        generate.run_sample(config, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run --mode=sample"):
        generate.run_eval(config, str(tmp_path))
    config.sample.method = "euler_maruyama"
    with pytest.raises(ValueError, match="sample.method='euler_maruyama'.*ddim"):
        generate.run_sample(config, str(tmp_path))
