"""The Flax FID Inception against pytorch-fid's PyTorch network, and its weight conversion.

Random weights (with non-trivial BatchNorm statistics) go into pytorch-fid's
`InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)` through a
patched `load_state_dict_from_url`, and through our conversion into the Flax model; pool3,
the spatial features (a hook on Mixed_6d.branch1x1) and the logits must agree.
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_bs import inception

torch = pytest.importorskip("torch")  # in the test extras; the conversion needs it too
_TORCHVISION_OPS = []  # keeps the op schemas below alive


def _import_pytorch_fid():
    """`import pytorch_fid.inception`, also where torchvision cannot load its C++ ops.

    pip finds only a CUDA build of torchvision 0.28 beside the CPU torch 2.13 here; its
    `_C.so` needs libc10_cuda.so, and torchvision then fails at import on two unguarded
    `register_fake("torchvision::nms"/"qnms")` calls. pytorch-fid uses none of those ops, so
    declaring the two schemas (no kernels) lets torchvision's Python models import.
    """
    try:
        import pytorch_fid.inception
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "pytorch_fid")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.append(lib)
        import pytorch_fid.inception
    return pytorch_fid.inception


def _random_state_dict(torchvision, seed=0):
    """Random weights under the keys of torchvision's 1008-class Inception (as pytorch-fid's)."""
    template = torchvision.models.inception_v3(
        weights=None, num_classes=1008, aux_logits=False, init_weights=False
    ).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in template.items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            state[key] = value
        elif key == "fc.weight":
            state[key] = torch.randn(value.shape, generator=g) / value.shape[1] ** 0.5
        elif leaf == "weight" and value.ndim == 4:  # He-normal convolutions
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / value[0].numel()) ** 0.5
        elif leaf == "weight":  # BN scale
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        elif leaf == "running_var":
            state[key] = torch.rand(value.shape, generator=g) * 1.5 + 0.5
        else:  # BN bias, running_mean, fc.bias
            state[key] = torch.randn(value.shape, generator=g) * 0.1
    return state


@pytest.fixture(scope="module")
def reference():
    """pytorch-fid's network with random weights, those weights, and them converted by us."""
    pfi = _import_pytorch_fid()
    import torchvision

    state_dict = _random_state_dict(torchvision)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
        model = pfi.InceptionV3(
            [3], resize_input=True, normalize_input=True, use_fid_inception=True
        ).eval()
    hooked = {}
    model.blocks[2][6].branch1x1.register_forward_hook(  # blocks[2][6] is Mixed_6d
        lambda module, args, out: hooked.__setitem__("branch1x1", out)
    )

    def torch_features(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's input
        with torch.no_grad():
            pool3 = model(x)[0].flatten(1)
            logits = torch.nn.functional.linear(pool3, state_dict["fc.weight"])  # fc, no bias
        spatial = hooked["branch1x1"][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)  # NHWC
        return {"pool3": pool3.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy()}

    return {
        "state_dict": state_dict,
        "variables": inception.convert_state_dict(state_dict),
        "torch_features": torch_features,
    }


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 333, 310, 3)], ids=["32x32", "333x310"])
def test_features_match_pytorch_fid(reference, shape):
    images = np.random.default_rng(shape[1]).integers(0, 256, shape, dtype=np.uint8)
    expected = reference["torch_features"](images)
    got = inception.features(images, reference["variables"], batch_size=2)
    assert got["pool3"].shape == (2, inception.POOL_DIM)
    assert got["spatial"].shape == (2, inception.SPATIAL_DIM)
    assert got["logits"].shape == (2, inception.NUM_LOGITS)
    for key in ("pool3", "spatial", "logits"):
        assert np.abs(expected[key]).max() > 0.5  # the random network is not degenerate
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-4, err_msg=key)


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((32, 32), (299, 299)), ((8, 13), (299, 299)), ((600, 333), (299, 299)), ((299, 64), (1, 7))],
)
def test_resize_is_torch_bilinear_without_antialiasing(in_hw, out_hw):
    x = np.random.default_rng(0).uniform(0, 1, (2, *in_hw, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False
    )
    got = inception.resize_bilinear(jnp.asarray(x), out_hw)
    np.testing.assert_allclose(np.asarray(got), expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_preprocess_repeats_grayscale_and_reads_uint8_and_float_alike():
    gray = np.random.default_rng(1).integers(0, 256, (2, 9, 7, 1), dtype=np.uint8)
    from_gray = np.asarray(inception.preprocess(jnp.asarray(gray)))
    from_rgb = np.asarray(inception.preprocess(jnp.asarray(np.repeat(gray, 3, axis=-1))))
    from_float = np.asarray(inception.preprocess(jnp.asarray(gray.astype(np.float32))))
    assert from_gray.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(from_gray, from_rgb)
    np.testing.assert_array_equal(from_gray, from_float)
    assert from_gray.min() >= -1.0 and from_gray.max() <= 1.0


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 8, 8)), "shape"),
        (np.zeros((2, 8, 8, 2), np.uint8), "shape"),
        (np.full((2, 8, 8, 3), -0.5), r"\[0, 255\]"),
        (np.zeros((2, 8, 8, 3), np.int32), "dtype"),
    ],
)
def test_features_reject_bad_images_before_running(images, match):
    with pytest.raises(ValueError, match=match):
        inception.features(images, {})


def test_conversion_command_end_to_end(reference, tmp_path):
    pth, out = tmp_path / inception.PTH_NAME, tmp_path / "sub" / "inception_fid.npz"
    torch.save(reference["state_dict"], pth)
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_bs.inception", "--convert", f"--pth={pth}", f"--out={out}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    loaded = traverse_util.flatten_dict(inception.load_params(out), sep="/")
    expected = traverse_util.flatten_dict(reference["variables"], sep="/")
    assert loaded.keys() == expected.keys() and len(loaded) == 94 * 5 + 2  # 94 conv+BN, fc
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    np.testing.assert_array_equal(  # torch's [out, in, kh, kw] → Flax's [kh, kw, in, out]
        loaded["params/Mixed_6d/branch7x7_2/conv/kernel"],
        reference["state_dict"]["Mixed_6d.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )


def test_conversion_rejects_other_networks(reference):
    state = dict(reference["state_dict"])
    del state["Mixed_7c.branch_pool.bn.running_var"]
    with pytest.raises(ValueError, match="1 missing.*Mixed_7c/branch_pool/bn/var"):
        inception.convert_state_dict(state)
    state = dict(reference["state_dict"], **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        inception.convert_state_dict(state)


def test_missing_weights_error_names_the_file_the_field_and_the_command(tmp_path):
    path = tmp_path / "inception_fid.npz"
    with pytest.raises(FileNotFoundError) as error:
        inception.load_params(path)
    message = str(error.value)
    assert str(path) in message and "sample.inception_weights" in message
    assert f"python -m ddpm_bs.inception --convert --pth=<{inception.PTH_NAME}> --out={path}" in (
        message
    )
    with pytest.raises(FileNotFoundError, match="not set.*sample.inception_weights"):
        inception.load_params(None)


def test_importing_the_model_does_not_import_torch():
    code = "import sys, ddpm_bs.inception; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
