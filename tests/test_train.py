"""The training system on CPU: sharding equivalence, learning, resume, configs and bad input."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import ROOT, cli_command, cli_env, smoke_config

from ddpm_bs import artifacts, data, state, train
from ddpm_bs.models import unet


def _batch(trainer, config, step=0):
    loader = data.build(
        data.DataSpec.from_config(config.data),
        seed=config.seed,
        global_batch_size=config.train.batch_size,
    )
    host = loader.batch_at(step)
    return jax.device_put(host, trainer.batch_sharding)


def test_one_step_on_8_devices_equals_one_device():
    results = []
    for n in (1, 8):
        config = smoke_config(mesh__data=n)
        trainer = train.Trainer(config)
        state, metrics = trainer.step(trainer.init(), _batch(trainer, config), trainer.train_key)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)


def test_gradient_accumulation_matches_the_full_batch(conv_denoiser):
    # (The accumulation does not depend on the network; the U-Net's step compiles 10× slower.)
    out = []
    for accum in (1, 4):
        config = smoke_config(train__batch_size=16, train__grad_accum_steps=accum)
        config.model.dropout = 0.0  # micro-batches draw their own dropout masks
        config.mesh.data = 2
        trainer = train.Trainer(config)
        state, metrics = trainer.step(trainer.init(), _batch(trainer, config), trainer.train_key)
        out.append((jax.device_get(state.params), jax.device_get(metrics)))
    np.testing.assert_allclose(out[0][1]["loss"], out[1][1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[0][1]["loss_q2"], out[1][1]["loss_q2"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[0][0], out[1][0]
    )


def test_loss_falls_on_digits():
    config = smoke_config(mesh__data=1)  # lr 2e-3 after 100 warm-up steps (configs/digits.py)
    trainer = train.Trainer(config)
    loader = data.build(data.DataSpec.from_config(config.data), seed=0, global_batch_size=8)
    state = trainer.init()
    losses = []
    for step in range(300):
        batch = jax.device_put(loader.batch_at(step), trainer.batch_sharding)
        state, metrics = trainer.step(state, batch, trainer.train_key)
        losses.append(metrics["mse"])
    losses = np.asarray(jax.device_get(losses))
    first, last = losses[:30].mean(), losses[-30:].mean()
    assert last < 0.6 * first, (first, last)


def _run(workdir, num_steps, **overrides):
    config = smoke_config(train__num_steps=num_steps, train__checkpoint_every=2, **overrides)
    return train.train_and_evaluate(config, str(workdir))


def test_checkpoint_of_another_model_is_refused_and_left_alone(tmp_path):
    _run(tmp_path, 2)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="written for another model.*Use a new --workdir"):
        _run(tmp_path, 4, model__model_channels=64)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_batch_not_divisible_by_devices_is_refused():
    with pytest.raises(ValueError, match="train.batch_size=12 must be divisible by the 8 devices"):
        train.Trainer(smoke_config(train__batch_size=12))


def test_unreachable_attention_resolution_is_refused():
    with pytest.raises(ValueError, match="attention_resolutions"):
        state.build_model(smoke_config(model__attention_resolutions=(3,)))


CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_its_model(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = state.build_model(config)
    state.build_sampler(config)
    state.build_loss(config)
    params = unet.abstract_params(model)
    assert unet.parameter_count(params) > 0
    size, ch = config.data.image_size, config.data.channels
    x = jax.ShapeDtypeStruct((2, size, size, ch), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(
        lambda p, x, t: model.apply({"params": p}, x, t, train=False), params, x, t
    )
    assert out.shape == (2, size, size, ch * (2 if config.model.learn_sigma else 1))
    assert out.dtype == jnp.float32
    if name.startswith("cifar10"):
        assert abs(unet.parameter_count(params) - 57.09e6) / 57.09e6 < 1e-3


def test_cifar10_adm_bs_is_the_paper_setting():
    c = importlib.import_module("configs.cifar10_adm_bs").get_config()
    assert (c.timesteps.sampler, c.timesteps.t_delta, c.timesteps.p) == ("bernoulli", 800, 0.8)
    assert c.diffusion.num_timesteps == 1000 and c.diffusion.schedule == "cosine"


def test_command_line_trains_and_writes_a_checkpoint_samples_and_metrics(tmp_path):
    cmd = cli_command(
        tmp_path, mesh__data=1, train__num_steps=3, train__log_every=1, train__sample_every=3
    )
    result = subprocess.run(
        cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert (tmp_path / "samples" / "step_00000003.png").is_file()
    assert (tmp_path / "config.json").is_file()
    metrics = artifacts.read_metrics(tmp_path)  # metrics.jsonl, beside TensorBoard's events
    np.testing.assert_array_equal(metrics["loss"][:, 0], [1, 2, 3])
    assert np.all(np.isfinite(metrics["loss"][:, 1])) and "steps_per_sec" in metrics


def test_command_line_reports_bad_input_in_one_line_and_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "ddpm_bs.main", "--config=configs/digits.py", f"--workdir={workdir}",
        "--config.data.name=folder", f"--config.data.folder={tmp_path / 'missing'}",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm-bs: ") and "data.folder" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "16"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, True),
    ],
)
def test_distributed_runtime_starts_only_when_launched_multiprocess(env, expected):
    from ddpm_bs import main

    assert main._launched_multiprocess(env) is expected


def test_training_evaluates_every_n_steps(tmp_path, caplog, conv_denoiser):
    config = smoke_config(
        train__num_steps=4, train__eval_every=2, train__eval_samples=6, train__num_samples=4
    )
    with caplog.at_level("INFO"):
        train.train_and_evaluate(config, str(tmp_path))
    results = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluation")]
    assert [m.split(":")[0] for m in results] == ["Evaluation at step 2", "Evaluation at step 4"]
    assert all("'digits_fid':" in m and "'num_samples': 6" in m for m in results), results
