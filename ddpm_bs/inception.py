"""The FID Inception in Flax: pool3 (FID), sFID's spatial features and the 1008 logits (IS).

The network is the TF 2015 Inception graph (`classify_image_graph_def.pb` of
inception-2015-12-05.tgz) that TTUR's FID, guided-diffusion's evaluator and pytorch-fid all
use, with exactly the architecture of pytorch-fid's port (`fid_inception_v3`): torchvision's
InceptionV3 with `FIDInceptionA` (Mixed_5b-d), `FIDInceptionC` (Mixed_6b-e), `FIDInceptionE_1`
(Mixed_7b) and `FIDInceptionE_2` (Mixed_7c). Where it differs from torchvision's Inception:
the 3×3 average pools of the A, C and E_1 blocks leave the zero padding out of the average
(`count_include_pad=False`, as TF's pools do), E_2's pool branch is a 3×3 *max* pool, every
convolution is conv (no bias) → BatchNorm (ε = 0.001, running statistics) → ReLU, and the
classifier has 1008 outputs.

Input: uint8 or float images [N, H, W, C] with values in [0, 255], C = 3 (or 1, repeated to
3). They are resized to 299×299 as pytorch-fid does, `F.interpolate(x / 255, (299, 299),
mode='bilinear', align_corners=False)` (half-pixel centres, source coordinates clamped at 0,
two taps per axis, no antialiasing even when shrinking; `jax.image.resize` would antialias),
then mapped to [−1, 1] as 2x − 1.

Outputs (`InceptionV3.__call__`, `forward`, `features`):

* `pool3` [N, 2048]: the final 8×8 average pool, TF's `pool_3:0`; FID's features.
* `spatial` [N, 2023]: sFID's features (Nash et al., 2021) as guided-diffusion's evaluator
  takes them: the tensor `mixed_6/conv:0` cut to its first 7 channels (`spatial[..., :7]`)
  and flattened in TF's NHWC order (row, column, channel), 17·17·7 = 2023.
* `logits` [N, 1008]: pool3 @ W of the `softmax/logits` layer *without* its bias, which is
  what guided-diffusion's `_create_softmax_graph` multiplies (it fetches only the MatMul's
  weight input); IS takes the softmax over all 1008. The bias is kept in the params.

What was verified, and against what (guided-diffusion `evaluations/evaluator.py`;
pytorch-fid `src/pytorch_fid/inception.py`; torch-fidelity `utils/util_convert_inception_
weights.py`, which maps the TF graph's variables onto the same PyTorch module names):

* `FID_SPATIAL_NAME = "mixed_6/conv:0"` and `spatial = spatial[..., :7]` in the evaluator.
* The TF graph names its mixed blocks `mixed, mixed_1, …, mixed_10` for Mixed_5b, 5c, 5d, 6a,
  6b, 6c, 6d, 6e, 7a, 7b, 7c, so `mixed_6` is Mixed_6d, and `mixed_6/conv/{conv2d_params,
  batchnorm}` are `Mixed_6d.branch1x1.{conv,bn}`: 192 channels at 17×17.
* Inferred, not checked against the .pb (nothing is downloaded here): the op named by the
  scope itself, `mixed_6/conv`, is the scope's output after BN and ReLU (its Conv2D and
  batchnorm ops live under `mixed_6/conv/...`, as `pool_3` names the pool's output); other
  PyTorch ports of sFID read the same tensor as the output of `Mixed_6d.branch1x1`
  (BasicConv2d, so after ReLU), moved to NHWC and cut to 7 channels.
* Being the first branch of Mixed_6d's concatenation, that tensor is Mixed_6d's output
  channels 0..191, which is how it is read here; the test compares it with a forward hook
  on pytorch-fid's `Mixed_6d.branch1x1`.
* pytorch-fid's weights (`pt_inception-2015-12-05-6726825d.pth`) and torch-fidelity's are
  the same conversion of that graph (same hash suffix).

Not bit-identical to the TF evaluator, by design: the TF graph resizes with TF1's legacy
bilinear (no half-pixel centres) and normalises as (x − 128)/128, so its features differ
slightly from pytorch-fid's, whose preprocessing is matched here. Compare FIDs only when
computed by the same implementation.

Weights: pytorch-fid's PyTorch state_dict, converted once (nothing is ever downloaded):

    python -m ddpm_bs.inception --convert --pth=pt_inception-2015-12-05-6726825d.pth \\
        --out=inception_fid.npz

pytorch-fid keeps its download in `~/.cache/torch/hub/checkpoints/`; the file is the release
asset named in `pytorch_fid.inception.FID_WEIGHTS_URL`. Point `sample.inception_weights` at
the .npz.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INPUT_SIZE = 299  # pixels, the graph's input side
POOL_DIM = 2048
SPATIAL_SIZE, SPATIAL_CHANNELS = 17, 7
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
BN_EPSILON = 1e-3
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = "python -m ddpm_bs.inception --convert --pth=<{}> --out={}"
_COLLECTIONS = ("params", "batch_stats")


# --------------------------------------------------------------------------------------------
# Preprocessing


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (lo [out], hi [out]) and weight of hi (frac [out]) of PyTorch's bilinear.

    `F.interpolate(size=..., align_corners=False)` in float32: scale = in/out, source
    coordinate s = scale·(i + ½) − ½ clamped below at 0, lo = ⌊s⌋, hi = min(lo + 1, in − 1),
    frac = s − lo. PyTorch's CPU kernel evaluates s with a fused multiply-add (one rounding),
    emulated here exactly in float64; rounding twice moves s by an ulp for some sizes.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`, no antialiasing.

    Args:
      x: [N, H, W, C] float.
      size: (out_H, out_W).

    Returns:
      [N, out_H, out_W, C], each output a two-tap blend per axis (width, then height).
    """
    for axis, out in ((2, size[1]), (1, size[0])):
        if x.shape[axis] == out:
            continue  # scale 1: PyTorch copies
        lo, hi, frac = _bilinear_taps(x.shape[axis], out)
        shape = [1, 1, 1, 1]
        shape[axis] = out
        frac = jnp.asarray(frac).reshape(shape)
        x = (1.0 - frac) * jnp.take(x, lo, axis=axis) + frac * jnp.take(x, hi, axis=axis)
    return x


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 or float [N, H, W, C ∈ {1, 3}] in [0, 255] → float32 [N, 299, 299, 3] in [−1, 1]."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


# --------------------------------------------------------------------------------------------
# The network (names follow torchvision/pytorch-fid, so the state_dict maps key by key)


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) → BatchNorm(ε=0.001, running stats) → ReLU."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: int | tuple[int, int] = 0  # PyTorch-style symmetric zero padding (rows, cols)
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=_pad(self.padding),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3, stride 1, pad 1, padding left out of the average (TF's pool; count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b-d (pytorch-fid's FIDInceptionA): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1."""

    pool_features: int
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(ConvBN, precision=self.precision)
        b1 = conv(64, name="branch1x1")(x)
        b5 = conv(48, name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's InceptionB): 35×35 → 17×17."""

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(ConvBN, precision=self.precision)
        b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = conv(64, name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e (pytorch-fid's FIDInceptionC): factorised 7×7 branches; channels 0..191 = 1×1."""

    channels_7x7: int
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(ConvBN, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, name="branch1x1")(x)
        b7 = conv(c7, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's InceptionD): 17×17 → 8×8."""

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(ConvBN, precision=self.precision)
        b3 = conv(192, name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (pytorch-fid's FIDInceptionE_1/_2): the pool branch averages (7b) or maxes (7c)."""

    max_pool: bool
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(ConvBN, precision=self.precision)
        b1 = conv(320, name="branch1x1")(x)
        b3 = conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:  # the TF graph's quirk in its last block
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
    """The `softmax/logits` layer: x @ kernel [2048, 1008]. Its bias is a param, left unused."""

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
        self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
        return jnp.dot(x, kernel, precision=self.precision)


class InceptionV3(nn.Module):
    """The FID Inception on preprocessed input.

    Attributes:
      precision: of every conv and the logits matmul. 'highest' keeps float32 on GPUs/TPUs
        whose default would use TF32/bf16 passes; CPUs compute float32 either way.
    """

    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """x: [N, 299, 299, 3] float32 in [−1, 1] (see `preprocess`) → pool3, spatial, logits."""
        conv = functools.partial(ConvBN, precision=self.precision)
        p = self.precision
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
        x = conv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)  # 73
        x = conv(80, name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
        x = _max_pool_3x3_s2(x)  # 35
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)  # 17
        x = InceptionC(128, p, name="Mixed_6b")(x)
        x = InceptionC(160, p, name="Mixed_6c")(x)
        x = InceptionC(160, p, name="Mixed_6d")(x)
        spatial = x[..., :SPATIAL_CHANNELS]  # Mixed_6d.branch1x1 = TF's mixed_6/conv, 7 of 192
        x = InceptionC(192, p, name="Mixed_6e")(x)
        x = InceptionD(p, name="Mixed_7a")(x)  # 8
        x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        return {
            "pool3": pool3,
            "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": Logits(p, name="fc")(pool3),
        }


def forward(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
    """Raw images → features; pure and jittable (inside your own jit, for instance).

    Args:
      variables: {'params': ..., 'batch_stats': ...}, as `load_params` returns.
      images: uint8 or float [N, H, W, C ∈ {1, 3}] in [0, 255].

    Returns:
      {'pool3': [N, 2048], 'spatial': [N, 2023], 'logits': [N, 1008]} float32.
    """
    return InceptionV3().apply(variables, preprocess(images))


_preprocess_jit = jax.jit(preprocess)
_network_jit = jax.jit(lambda variables, x: InceptionV3().apply(variables, x))


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Validates Inception input on the host: [N ≥ 1, H, W, C ∈ {1, 3}], uint8 or float in [0, 255]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(
            f"{name}: expected [N, H, W, C] with N ≥ 1 and C in (1, 3), got shape {images.shape}."
        )
    if np.issubdtype(images.dtype, np.floating):
        if not np.all(np.isfinite(images)):
            raise ValueError(f"{name}: contains NaN or inf.")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 255.0:
            raise ValueError(
                f"{name}: float pixels must lie in [0, 255], got [{lo:.3g}, {hi:.3g}]; "
                "map samples in [−1, 1] with (x + 1) · 127.5, or pass uint8."
            )
    elif images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {images.dtype}.")
    return images


def features(
    images: np.ndarray, params: Mapping[str, Any], *, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Inception features of many images, in batches, on the default device.

    The resize (compiled per input size) and the network (compiled once per batch shape) are
    separate jitted functions, so any input size reuses one compiled network. The last batch
    is zero-padded to the batch shape; with N < batch_size the batch shape is N.

    Args:
      images: uint8 or float [N, H, W, C ∈ {1, 3}] in [0, 255] (checked on the host).
      params: the variables from `load_params` (numpy or already on device).
      batch_size: images per network call.

    Returns:
      {'pool3': [N, 2048], 'spatial': [N, 2023], 'logits': [N, 1008]} float32 numpy.
    """
    images = check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    variables = jax.device_put(params)
    n = images.shape[0]
    chunk = min(batch_size, n)
    outputs: dict[str, list[np.ndarray]] = {"pool3": [], "spatial": [], "logits": []}
    for start in range(0, n, chunk):
        batch = images[start : start + chunk]
        pad = chunk - batch.shape[0]
        if pad:  # keep one compiled shape for the tail
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
        out = _network_jit(variables, _preprocess_jit(batch))
        for key, value in jax.device_get(out).items():
            outputs[key].append(np.asarray(value)[: chunk - pad])
    return {key: np.concatenate(value) for key, value in outputs.items()}


# --------------------------------------------------------------------------------------------
# Weights


@functools.lru_cache(maxsize=1)
def _abstract_variables() -> dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)
    return {c: shapes[c] for c in _COLLECTIONS}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(_abstract_variables(), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def _check_flat(flat: Mapping[str, np.ndarray], where: str) -> None:
    expected = _expected_shapes()
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: not the FID Inception's weights: {len(missing)} missing "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})."
        )
    for key, shape in expected.items():
        if tuple(flat[key].shape) != shape:
            raise ValueError(f"{where}: {key} has shape {flat[key].shape}, expected {shape}.")


def random_params(seed: int = 0) -> dict[str, Any]:
    """Random weights with the real shapes, for tests and benchmarks (not for FID).

    Convolutions are He-normal, BatchNorm scales/biases and running statistics are random
    but non-trivial (mean ≠ 0, var ≠ 1), so every parameter changes the output.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in _expected_shapes().items():
        leaf = key.rsplit("/", 1)[-1]
        if leaf == "kernel":
            std = np.sqrt(2.0 / int(np.prod(shape[:-1])))  # He-normal over the fan-in
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        elif leaf == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "var":
            value = rng.uniform(0.5, 2.0, shape)
        else:  # BN bias, BN mean, fc bias
            value = rng.normal(0.0, 0.1, shape)
        flat[key] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """pytorch-fid's `fid_inception_v3` state_dict → our {'params', 'batch_stats'} (numpy).

    `X.conv.weight` [O, I, kh, kw] → params/X/conv/kernel [kh, kw, I, O]; `X.bn.weight`,
    `.bias` → params/X/bn/scale, bias; `X.bn.running_mean`, `.running_var` →
    batch_stats/X/bn/mean, var; `fc.weight` [1008, 2048] → params/fc/kernel (transposed),
    `fc.bias` → params/fc/bias. `num_batches_tracked` is dropped. Values may be torch tensors
    or arrays; torch itself is not imported here.
    """
    flat = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        value = np.asarray(value, dtype=np.float32)
        module, leaf = key.rsplit(".", 1)
        path = module.replace(".", "/")
        if key == "fc.weight":
            flat["params/fc/kernel"] = value.T
        elif key == "fc.bias":
            flat["params/fc/bias"] = value
        elif module.endswith(".conv") and leaf == "weight":
            flat[f"params/{path}/kernel"] = value.transpose(2, 3, 1, 0)
        elif module.endswith(".bn") and leaf in ("weight", "bias"):
            flat[f"params/{path}/{'scale' if leaf == 'weight' else 'bias'}"] = value
        elif module.endswith(".bn") and leaf in ("running_mean", "running_var"):
            flat[f"batch_stats/{path}/{leaf[len('running_') :]}"] = value
        else:
            raise ValueError(f"state_dict: unexpected key {key!r} for the FID Inception.")
    _check_flat(flat, "state_dict")
    return traverse_util.unflatten_dict(
        {k: np.ascontiguousarray(v) for k, v in flat.items()}, sep="/"
    )


def save_params(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Writes variables as a flat .npz: `params/Mixed_5b/branch1x1/conv/kernel`, ..."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    _check_flat(flat, str(path))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **flat)
    os.replace(tmp, path)


def missing_weights_message(path: str | os.PathLike | None) -> str:
    """What to do when the converted weights are not at `path`."""
    where = f"not found at {str(path)!r}" if path else "not set"
    out = str(path) if path else "inception_fid.npz"
    return (
        f"FID Inception weights {where} (config field sample.inception_weights). Nothing is "
        f"downloaded: convert pytorch-fid's {PTH_NAME} (the release asset in "
        "pytorch_fid.inception.FID_WEIGHTS_URL; pytorch-fid caches it in "
        f"~/.cache/torch/hub/checkpoints/) with `{CONVERT_COMMAND.format(PTH_NAME, out)}` and "
        "set sample.inception_weights to the .npz."
    )


def load_params(path: str | os.PathLike | None) -> dict[str, Any]:
    """Reads the .npz written by `save_params` / the conversion command, as numpy variables."""
    if not path or not pathlib.Path(path).is_file():
        raise FileNotFoundError(missing_weights_message(path))
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    _check_flat(flat, f"sample.inception_weights={str(path)!r}")
    return traverse_util.unflatten_dict(flat, sep="/")


def convert_pth(pth: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Converts pytorch-fid's .pth state_dict to our .npz; returns the variables."""
    pth = pathlib.Path(pth)
    if not pth.is_file():
        raise FileNotFoundError(
            f"--pth: {str(pth)!r} not found; pass pytorch-fid's {PTH_NAME} (see the module "
            "docstring for where pytorch-fid keeps it)."
        )
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "the conversion reads a PyTorch file and needs torch (CPU build is enough): "
            'pip install "torch<2.14", or pip install -e ".[test]".'
        ) from e
    state_dict = torch.load(pth, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"--pth: {str(pth)!r} holds a {type(state_dict).__name__}, not a state_dict."
        )
    variables = convert_state_dict(state_dict)
    save_params(out, variables)
    return variables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convert", action="store_true", help="convert --pth to --out")
    parser.add_argument("--pth", help=f"pytorch-fid's {PTH_NAME}")
    parser.add_argument("--out", default="inception_fid.npz", help="the .npz to write")
    args = parser.parse_args(argv)
    if not args.convert:
        parser.error("nothing to do: pass --convert --pth=<file.pth> --out=<file.npz>")
    if not args.pth:
        parser.error(f"--convert needs --pth=<path to {PTH_NAME}>")
    try:
        convert_pth(args.pth, args.out)
    except (FileNotFoundError, ImportError, ValueError) as e:
        sys.exit(f"ddpm_bs.inception: {e}")  # one line: the message names what to fix
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
