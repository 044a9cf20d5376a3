"""The whole U-Net against guided-diffusion's `UNetModel`, through the checkpoint converter.

The fixtures (tests/fixtures/guided_diffusion_*.npz, written by
make_guided_diffusion_fixture.py) hold guided-diffusion's own output for random weights on two
small configurations: ADM's (learned σ, AdaGN, residual up/down-sampling, the new qkv order,
num_head_channels) and improved-diffusion's (class-conditional, additive conditioning,
convolutional resampling, the legacy qkv order, three levels). Every level has the same
width, so a wrong skip pairing or a wrong up/down order still fits the shapes and only the
numbers can tell.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_bs.models import guided_diffusion, unet

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
NAMES = ("adm", "class_cond")


def _fixture(name):
    path = FIXTURES / f"guided_diffusion_{name}.npz"
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    return path, json.loads(str(arrays["flags"])), arrays


def _run(model, params, arrays):
    x = jnp.asarray(arrays["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    y = jnp.asarray(arrays["y"]) if "y" in arrays else None
    # One compiled program: eager dispatch compiles each of the U-Net's ops on its own (2x slower).
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, train=False))
    return np.asarray(apply(params, x, jnp.asarray(arrays["t"]), y)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", NAMES)
def test_converted_checkpoint_reproduces_guided_diffusion_outputs(name):
    path, flags, arrays = _fixture(name)
    model = unet.UNet(**guided_diffusion.unet_kwargs_from_flags(flags))
    params = guided_diffusion.convert_state_dict(guided_diffusion.load_state_dict(str(path)), model)
    out = _run(model, params, arrays)
    # Both sides compute in float32 from the same float16-exact weights; they differ by
    # summation order (conv algorithms, attention, GroupNorm). Measured: max |Δ| ≈ 4e-6 on
    # outputs of magnitude ≈ 2.5 (≈ 30 ulp after some 40 layers). 5e-5 leaves 10× headroom,
    # and the wrong implementations this guards against (a skip paired with the wrong block,
    # levels up-sampled in the wrong order, the other qkv order) move outputs by > 1e-1.
    np.testing.assert_allclose(out, arrays["out"], rtol=0, atol=5e-5)


def test_flags_of_the_64x64_release_build_its_unet():
    # guided-diffusion README, "64x64 model" MODEL_FLAGS.
    flags = (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
        "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
        "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
    )
    kwargs = guided_diffusion.unet_kwargs_from_flags(flags)
    assert kwargs["channel_mult"] == (1, 2, 3, 4)  # create_model's default for 64
    assert kwargs["attention_resolutions"] == (32, 16, 8)
    assert kwargs["num_classes"] == 1000
    assert kwargs["use_new_attention_order"] and kwargs["resblock_updown"]
    assert (kwargs["model_channels"], kwargs["num_head_channels"]) == (192, 64)
    overrides = guided_diffusion.config_overrides_from_flags(flags)
    assert overrides["model.use_new_attention_order"] is True


def test_config_overrides_of_the_lsun_release():
    flags = (
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
        "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True"
    )
    overrides = guided_diffusion.config_overrides_from_flags(flags)
    assert overrides["model.channel_mult"] == (1, 1, 2, 2, 4, 4)
    assert overrides["model.num_classes"] == 0 and overrides["diffusion.schedule"] == "linear"


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="--num_chanels"):
        guided_diffusion.parse_flags("--num_chanels 128")
    with pytest.raises(ValueError, match="--learn_sigma"):
        guided_diffusion.parse_flags("--learn_sigma maybe")
    # improved-diffusion's CIFAR-10 model (README flags; rescale_timesteps is its default)
    # sees t·1000/4000: not what ddpm_bs feeds it.
    cifar10 = (
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
        "--diffusion_steps 4000 --noise_schedule cosine"
    )
    with pytest.raises(ValueError, match="rescale_timesteps True --diffusion_steps 4000"):
        guided_diffusion.config_overrides_from_flags(cifar10, improved_diffusion=True)
    # Its class-conditional ImageNet-64 model was trained on t itself.
    imagenet64 = (
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True "
        "--class_cond True --diffusion_steps 4000 --noise_schedule cosine "
        "--rescale_learned_sigmas False --rescale_timesteps False"
    )
    overrides = guided_diffusion.config_overrides_from_flags(imagenet64, improved_diffusion=True)
    assert overrides["diffusion.num_timesteps"] == 4000
    assert overrides["model.channel_mult"] == (1, 2, 3, 4)


def test_mismatched_checkpoints_are_named():
    path, flags, _ = _fixture("class_cond")
    state = guided_diffusion.load_state_dict(str(path))
    model = unet.UNet(**guided_diffusion.unet_kwargs_from_flags(flags))

    with pytest.raises(ValueError, match=r"missing from the checkpoint: out\.2\.bias"):
        guided_diffusion.convert_state_dict(
            {k: v for k, v in state.items() if k != "out.2.bias"}, model
        )
    unconditional = unet.UNet(
        **guided_diffusion.unet_kwargs_from_flags({**flags, "class_cond": False})
    )
    with pytest.raises(ValueError, match="label_emb.weight.*--class_cond True"):
        guided_diffusion.convert_state_dict(state, unconditional)
    bad = dict(state, **{"out.2.weight": np.zeros((6, 32, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'out\.2\.weight' has shape \(6, 32, 3, 3\)"):
        guided_diffusion.convert_state_dict(bad, model)


def test_pt_checkpoints_load_with_torch_and_fail_clearly_without(tmp_path, monkeypatch):
    path, _, arrays = _fixture("adm")
    state = guided_diffusion.load_state_dict(str(path))
    torch = pytest.importorskip("torch")
    pt = tmp_path / "model.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pt)
    loaded = guided_diffusion.load_state_dict(str(pt))
    assert loaded.keys() == state.keys()
    np.testing.assert_array_equal(loaded["out.2.weight"], state["out.2.weight"])

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        guided_diffusion.load_state_dict(str(pt))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        guided_diffusion.load_state_dict(str(tmp_path / "missing.pt"))


def test_command_line_writes_params_that_load_back(tmp_path):
    path, flags, arrays = _fixture("class_cond")
    out = tmp_path / "params.npz"
    flag_line = " ".join(f"--{k} {v}" for k, v in flags.items())
    guided_diffusion.main(["--pt", str(path), "--flags", flag_line, "--out", str(out)])
    model = unet.UNet(**guided_diffusion.unet_kwargs_from_flags(flag_line))
    np.testing.assert_allclose(
        _run(model, guided_diffusion.load_params(str(out)), arrays), arrays["out"], atol=5e-5
    )


def _as_state_dict(params, model):
    """Our params laid out as a guided-diffusion state_dict (the converter's inverse)."""
    flat = guided_diffusion._flat(params)
    back = {(2, 3, 1, 0): (3, 2, 0, 1), (1, 0): (1, 0), None: None}
    out = {}
    for key, (ours, layout) in guided_diffusion._leaf_map(model).items():
        if ours in flat:
            value = np.asarray(flat[ours])
            out[key] = (
                value.T[:, :, None]
                if layout == "conv1d"
                else (value if back[layout] is None else value.transpose(back[layout]))
            )
    return out


def test_command_line_writes_a_step_zero_checkpoint_holding_the_params_as_ema(tmp_path):
    from support import ROOT, smoke_config

    from ddpm_bs import generate, train

    # One level keeps the checkpoint small (its save and restore dominate this test).
    flags = (
        "--image_size 8 --num_channels 32 --channel_mult 1 --num_res_blocks 1 "
        "--attention_resolutions 8 --learn_sigma True --class_cond True"
    )
    config = smoke_config()
    for field, value in guided_diffusion.config_overrides_from_flags(flags).items():
        section, name = field.split(".")
        config[section][name] = value
    trainer = train.Trainer(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32), trainer.abstract_state.params
    )
    np.savez(tmp_path / "model.npz", **_as_state_dict(params, trainer.model))
    workdir = str(tmp_path / "run")
    argv = ["--pt", str(tmp_path / "model.npz"), "--flags", flags, "--workdir", workdir]
    guided_diffusion.main([*argv, "--config", str(ROOT / "configs" / "smoke.py")])

    ema, step = generate.restore_ema_params(config, workdir)
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema), params)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        guided_diffusion.write_checkpoint(config, workdir, params)
    config.model.num_res_blocks = 2
    with pytest.raises(ValueError, match="do not fit the config.s model: down0_attn1/norm/bias"):
        guided_diffusion.write_checkpoint(config, str(tmp_path / "other"), params)
