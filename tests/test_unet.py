"""Tests of the ADM U-Net against guided-diffusion's architecture and numpy references."""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_bs.models import layers, unet

CIFAR10 = dict(
    image_size=32,
    in_channels=3,
    model_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=3,
    attention_resolutions=(16, 8),
    num_heads=4,
    use_scale_shift_norm=True,
    resblock_updown=True,
    dropout=0.3,
    learn_sigma=True,
)
# Small enough to compile in seconds on a 2-core CPU; still has every kind of block:
# resample ResBlocks, attention at 8x8 on both paths, the middle block, learned sigma.
TINY = dict(
    image_size=16,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    dropout=0.1,
    learn_sigma=True,
)


# ---------------------------------------------------------------- numpy references (float64)


def _torch_layout_param_count(
    *, in_channels, model_channels, out_channels, channel_mult, num_res_blocks, attention_ds
):
    """guided-diffusion UNetModel.__init__'s bookkeeping with PyTorch layers' parameter counts.

    conv/linear: weight + bias; GroupNorm: weight + bias; attention qkv is a Conv1d(C, 3C, 1).
    Scale-shift norm and resblock_updown are on (the CIFAR-10 config).
    """
    conv = lambda i, o, k: i * o * k * k + o
    norm = lambda c: 2 * c
    emb = 4 * model_channels

    def res(ch, out=None):
        out = out or ch
        n = norm(ch) + conv(ch, out, 3) + conv(emb, 2 * out, 1) + norm(out) + conv(out, out, 3)
        return n + (conv(ch, out, 1) if out != ch else 0)

    attn = lambda ch: norm(ch) + conv(ch, 3 * ch, 1) + conv(ch, ch, 1)
    n = conv(model_channels, emb, 1) + conv(emb, emb, 1)
    ch = model_channels * channel_mult[0]
    n += conv(in_channels, ch, 3)
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            n += res(ch, mult * model_channels)
            ch = mult * model_channels
            n += attn(ch) if ds in attention_ds else 0
            chans.append(ch)
        if level != len(channel_mult) - 1:
            n += res(ch)
            chans.append(ch)
            ds *= 2
    n += res(ch) + attn(ch) + res(ch)
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            n += res(ch + chans.pop(), mult * model_channels)
            ch = mult * model_channels
            n += attn(ch) if ds in attention_ds else 0
            if level and i == num_res_blocks:
                n += res(ch)
                ds //= 2
    return n + norm(ch) + conv(model_channels * channel_mult[0], out_channels, 3)


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def _np_group_norm(x, p, groups=32, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
        g.var(axis=(1, 2, 4), keepdims=True) + eps
    )
    return g.reshape(b, h, w, c) * p["scale"] + p["bias"]


def _np_conv(x, p, stride=1):
    """PyTorch Conv2d(k, padding=k // 2, stride) in NHWC; kernel [k, k, Cin, Cout]."""
    kernel, k = p["kernel"], p["kernel"].shape[0]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    out = sum(
        np.einsum("bhwc,cd->bhwd", xp[:, i : i + h, j : j + w], kernel[i, j])
        for i in range(k)
        for j in range(k)
    )
    # A stride-2 conv with padding 1 reads the same taps as the stride-1 conv at even outputs.
    return out[:, ::stride, ::stride] + p["bias"]


def _np_resblock(p, x, emb, *, scale_shift, up, down):
    h = _np_silu(_np_group_norm(x, p["norm_in"]))
    if up:
        h, x = (a.repeat(2, axis=1).repeat(2, axis=2) for a in (h, x))
    if down:
        h, x = (
            a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2, a.shape[3]).mean((2, 4))
            for a in (h, x)
        )
    h = _np_conv(h, p["conv_in"])
    e = (_np_silu(emb) @ p["emb_proj"]["kernel"] + p["emb_proj"]["bias"])[:, None, None, :]
    if scale_shift:
        scale, shift = np.split(e, 2, axis=-1)
        h = _np_group_norm(h, p["norm_out"]) * (1 + scale) + shift
    else:
        h = _np_group_norm(h + e, p["norm_out"])
    h = _np_conv(_np_silu(h), p["conv_out"])
    skip = _np_conv(x, p["skip"]) if "skip" in p else x
    return skip + h


def _np_attention(p, x, heads, new_order):
    """guided-diffusion's AttentionBlock + QKVAttention(Legacy), transliterated, in [B, C, T]."""
    b, hh, ww, c = x.shape
    h = _np_group_norm(x, p["norm"]).reshape(b, hh * ww, c)
    qkv = (h @ p["qkv"]["kernel"] + p["qkv"]["bias"]).transpose(0, 2, 1)  # [B, 3C, T]
    ch = c // heads
    if new_order:  # QKVAttention: split q, k, v first, then heads.
        q, k, v = (a.reshape(b * heads, ch, -1) for a in np.split(qkv, 3, axis=1))
    else:  # QKVAttentionLegacy: split heads first, then q, k, v.
        q, k, v = np.split(qkv.reshape(b * heads, 3 * ch, -1), 3, axis=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = np.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = np.exp(weight - weight.max(-1, keepdims=True))
    weight /= weight.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1).transpose(0, 2, 1)
    out = a @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    return x + out.reshape(b, hh, ww, c)


# ---------------------------------------------------------------- helpers


def _perturb(params, seed):
    """Add noise to every parameter, so zero-initialised layers contribute (a 'trained' net).

    Kernels get N(0, 1/fan_in) noise, vectors N(0, 0.1²).
    """
    rng = np.random.default_rng(seed)

    def noise(leaf):
        std = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1
        return leaf + jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree.map(noise, params)


def _inputs(model, batch_size, seed):
    rng = np.random.default_rng(seed)
    shape = (batch_size, model.image_size, model.image_size, model.in_channels)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch_size), jnp.int32)
    return x, t


def _key(seed):
    """An 'rbg' key: with jax_threefry_partitionable (conftest) on jax 0.10 CPU, every jitted
    threefry draw costs ~10 s of compile; the model does not care which PRNG feeds it."""
    return jax.random.key(seed, impl="rbg")


def _init_block(block, *args):
    return jax.jit(lambda key: block.init({"params": key}, *args))(_key(0))["params"]


def _to_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, params, x, t, key, *, train):
    return model.apply({"params": params}, x, t, train=train, rngs={"dropout": key})


@pytest.fixture(scope="module")
def tiny():
    """(model, params from a real init) for the TINY config, initialised once per module."""
    model = unet.UNet(**TINY)
    x, t = _inputs(model, 2, seed=0)
    init = jax.jit(lambda key: model.init({"params": key}, x, t, train=False)["params"])
    return model, init(_key(0))


# ---------------------------------------------------------------- architecture


def test_cifar10_config_has_guided_diffusions_57_09m_parameters():
    model = unet.UNet(**CIFAR10)
    count = unet.parameter_count(unet.abstract_params(model))  # eval_shape: no real init
    assert abs(count / 57.09e6 - 1) < 1e-3, count
    reference = _torch_layout_param_count(
        in_channels=3,
        model_channels=128,
        out_channels=6,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attention_ds={2, 4},
    )
    assert count == reference == 57_094_662


def _abstract_forward(model, batch_size=2):
    params = unet.abstract_params(model)
    x, t, y = unet.example_inputs(model, batch_size)
    fn = lambda p, x, t, y: model.apply({"params": p}, x, t, y, train=False)
    return jax.eval_shape(fn, params, x, t, y)


@pytest.mark.parametrize(
    "config",
    [
        dict(image_size=8, channel_mult=(1, 2), attention_resolutions=(4,)),
        dict(image_size=16, learn_sigma=True, num_classes=10, attention_resolutions=(8,)),
        dict(image_size=16, num_head_channels=16, resblock_updown=False, in_channels=1),
        dict(image_size=32, channel_mult=(1, 2, 2, 2), conv_resample=False, dtype=jnp.bfloat16),
        dict(
            image_size=32,
            attention_resolutions=(16,),
            use_scale_shift_norm=False,
            use_new_attention_order=True,
            remat=True,
        ),
    ],
)
def test_output_shape_matches_input_with_out_channels(config):
    config = dict(dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2)), **config)
    model = unet.UNet(**config)
    out = _abstract_forward(model)
    expected = config.get("in_channels", 3) * (2 if config.get("learn_sigma") else 1)
    size = config["image_size"]
    assert out.shape == (2, size, size, expected) and model.output_channels == expected
    assert out.dtype == jnp.float32


def test_class_label_is_required_iff_num_classes_is_set():
    with pytest.raises(ValueError, match="num_classes"):
        model = unet.UNet(**TINY)
        params = unet.abstract_params(model)
        x, t, _ = unet.example_inputs(model, 2)
        y = jax.ShapeDtypeStruct((2,), jnp.int32)
        jax.eval_shape(lambda p: model.apply({"params": p}, x, t, y, train=False), params)


def test_default_channel_mult_follows_guided_diffusion():
    assert unet.default_channel_mult(32) == (1, 2, 2, 2)
    assert unet.default_channel_mult(64) == (1, 2, 3, 4)
    assert unet.default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert unet.UNet(image_size=512).resolved_channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        unet.default_channel_mult(48)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(image_size=36), "image_size"),  # 36 is not divisible by 2^3
        (dict(attention_resolutions=(16, 3)), "attention_resolutions"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_head_channels=48), "num_head_channels"),
        (dict(num_heads_upsample=5), "num_heads_upsample"),
        (dict(model_channels=48), "model_channels"),
        (dict(channel_mult=(1, 1.1, 2, 2)), "channel_mult"),  # 140 channels
        (dict(image_size=48, channel_mult=None), "channel_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(out_channels=3), "out_channels"),  # learn_sigma needs 6
        (dict(attention_implementation="flash"), "attention_implementation"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"UNet\.{field}:"):
        unet.UNet(**dict(CIFAR10, **overrides))


def test_unreachable_attention_resolution_error_lists_reachable_ones():
    with pytest.raises(ValueError, match=r"\[32, 16, 8, 4\]"):
        unet.UNet(**dict(CIFAR10, attention_resolutions=(2,)))


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("dim", [128, 7])
def test_timestep_embedding_matches_cos_sin_formula(dim):
    t = np.array([0, 1, 17, 999, 250.5])
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    args = t[:, None] * freqs[None, :]
    expected = np.concatenate([np.cos(args), np.sin(args), np.zeros((len(t), dim % 2))], -1)
    got = layers.timestep_embedding(jnp.asarray(t, jnp.float32), dim)
    chex.assert_shape(got, (len(t), dim))
    # float32 arguments up to 1000 carry absolute rounding ~6e-5 into cos/sin.
    np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize(
    "num_heads, num_head_channels, new_order",
    [(2, -1, False), (1, 16, False), (4, -1, True)],
)
def test_attention_block_matches_guided_diffusion_numpy(num_heads, num_head_channels, new_order):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 64)), jnp.float32)
    block = layers.AttentionBlock(
        num_heads=num_heads, num_head_channels=num_head_channels, use_new_attention_order=new_order
    )
    params = _perturb(_init_block(block, x), seed=2)  # proj_out is zero at init
    got = jax.jit(block.apply)({"params": params}, x)
    heads = layers.attention_heads(64, num_heads, num_head_channels)
    expected = _np_attention(_to_np(params), np.asarray(x, np.float64), heads, new_order)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "out_channels, scale_shift, up, down",
    [(64, True, False, True), (32, False, True, False)],
)
def test_res_block_matches_numpy(out_channels, scale_shift, up, down):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 32)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
    block = layers.ResBlock(out_channels, use_scale_shift_norm=scale_shift, up=up, down=down)
    params = _perturb(_init_block(block, x, emb, False), seed=4)  # conv_out is zero at init
    got = jax.jit(functools.partial(block.apply, train=False))({"params": params}, x, emb)
    expected = _np_resblock(
        _to_np(params), *_to_np((x, emb)), scale_shift=scale_shift, up=up, down=down
    )
    chex.assert_shape(got, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_downsample_conv_pads_like_pytorch():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 8, 8, 4)), jnp.float32)
    block = layers.Downsample(use_conv=True, out_channels=8)
    params = _init_block(block, x)
    got = jax.jit(block.apply)({"params": params}, x)
    expected = _np_conv(np.asarray(x, np.float64), _to_np(params)["conv"], stride=2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the full model


def test_output_is_exactly_zero_at_init(tiny):
    model, params = tiny
    x, t = _inputs(model, 2, seed=6)
    out = _apply(model, params, x, t, _key(0), train=False)
    chex.assert_shape(out, (2, 16, 16, 6))
    assert out.dtype == jnp.float32
    assert not np.any(np.asarray(out))


def test_bf16_compute_keeps_float32_params_and_output_close_to_float32(tiny):
    model, params = tiny
    params = _perturb(params, seed=7)
    bf16 = model.clone(dtype=jnp.bfloat16)
    for leaf in jax.tree.leaves(unet.abstract_params(bf16)):
        assert leaf.dtype == jnp.float32
    x, t = _inputs(model, 2, seed=8)
    key = _key(0)
    out32 = _apply(model, params, x, t, key, train=False)
    out16 = _apply(bf16, params, x, t, key, train=False)
    assert out16.dtype == jnp.float32
    # bf16 keeps 8 significant bits: each rounding of an activation, weight or result is off
    # by up to 2^-9 ≈ 0.2%. One perturbed ResBlock or AttentionBlock measured 0.4-0.5%
    # relative error in its output, and this model (5 ResBlocks, 3 attention blocks, 2
    # resampling blocks in sequence) 1.6-1.7% over three seeds. 5% leaves room for other
    # seeds/backends while still catching gross errors (a wrong cast, a lost term, overflow);
    # it cannot tell subtler precision slips apart.
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert rel < 5e-2, rel


def test_bf16_step_runs_every_conv_and_feature_map_matmul_in_bf16_but_the_output_layer(tiny):
    # The hot path must not up-cast: read the types of each convolution and dot_general in
    # the lowered forward + backward (before XLA's CPU backend may rewrite bf16 convolutions).
    model, params = tiny
    bf16 = model.clone(dtype=jnp.bfloat16)
    x, t = _inputs(model, 2, seed=8)

    def loss(params):
        out = bf16.apply({"params": params}, x, t, train=True, rngs={"dropout": _key(0)})
        return jnp.mean(jnp.square(out))

    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    convs, dots = [], []
    for line in text.splitlines():
        op = re.search(r"stablehlo\.(convolution|dot_general)", line)
        if op:
            shapes = re.findall(r"tensor<([^>]*)>", line.rsplit(" : ", 1)[-1])
            (convs if op.group(1) == "convolution" else dots).append(
                [s.split("x") for s in shapes]  # ['2', '16', '16', '32', 'bf16'] per tensor
            )
    out_channels = str(bf16.output_channels)
    f32_convs = [c for c in convs if any(s[-1] == "f32" for s in c)]
    # The output conv (forward, and its input and kernel gradients) stays float32, as
    # guided-diffusion keeps its `out` block in float32; it has the output's channel count.
    assert len(f32_convs) == 3 and all(any(s[-2] == out_channels for s in c) for c in f32_convs)
    assert len(convs) > 3 * 10  # the ResBlocks' convolutions, forward and backward, are bf16
    # float32 × float32 matmuls are the conditioning path's ([B, C] vectors), never feature maps.
    assert all(len(s) <= 3 for d in dots if all(s[-1] == "f32" for s in d[:2]) for s in d)
    assert any(all(s[-1] == "bf16" for s in d) for d in dots)  # qkv and proj_out


def test_dropout_only_in_train_mode_and_follows_the_dropout_key(tiny):
    model, params = tiny
    params = _perturb(params, seed=9)  # a non-zero output, so dropout can show
    x, t = _inputs(model, 2, seed=10)
    k1, k2 = _key(1), _key(2)
    eval1 = _apply(model, params, x, t, k1, train=False)
    eval2 = _apply(model, params, x, t, k2, train=False)
    chex.assert_trees_all_equal(eval1, eval2)
    assert np.any(np.asarray(eval1))
    train1 = _apply(model, params, x, t, k1, train=True)
    chex.assert_trees_all_equal(train1, _apply(model, params, x, t, k1, train=True))
    assert not np.allclose(train1, _apply(model, params, x, t, k2, train=True))
    assert not np.allclose(train1, eval1)


def test_remat_model_traces_gradients_for_every_parameter():
    model = unet.UNet(**TINY, remat=True)
    params = unet.abstract_params(model)
    x, t, _ = unet.example_inputs(model, 2)

    def loss(p, x, t, key):
        return jnp.sum(model.apply({"params": p}, x, t, train=True, rngs={"dropout": key}))

    key = jax.ShapeDtypeStruct((), _key(0).dtype)
    grads = jax.eval_shape(jax.grad(loss), params, x, t, key)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)


def test_flops_per_image_counts_the_convolutions_and_a_backward_of_two_forwards():
    model = unet.UNet(
        image_size=8, model_channels=32, channel_mult=(1,), num_res_blocks=0,
        attention_resolutions=(), dropout=0.0,  # no dropout: no RNG to compile
    )  # fmt: skip
    forward = unet.flops_per_image(model, batch_size=2, backward=False)
    train = unet.flops_per_image(model, batch_size=2)
    # The forward's convolutions per image, as XLA counts them (taps on padding excluded:
    # 22 of a 3x3 conv's 24 taps per row land inside an 8-pixel row). 3x3 convs (Cin·Cout):
    # in_conv 3·32, 2 in each of mid_res0 and mid_res1 (32·32), up0_res0 (64·32 + 32·32),
    # out_conv 32·3; plus up0_res0's 1x1 skip (64·32) over all 64 pixels.
    conv3x3 = 2 * 22 * 22 * (3 * 32 + 4 * 32 * 32 + 64 * 32 + 32 * 32 + 32 * 3)
    skip = 2 * 64 * 64 * 32
    convs = conv3x3 + skip
    # The rest (middle attention ≈ 1 MFLOP, norms, MLPs) is small next to the convolutions.
    assert convs < forward < 1.3 * convs
    assert 2.5 < train / forward < 3.5  # backward ≈ 2 forwards (input and weight gradients)
