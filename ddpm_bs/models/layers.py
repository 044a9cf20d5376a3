"""Building blocks of the ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs").

One module per concept, each mirroring a class of guided-diffusion's `unet.py`/`nn.py`
(openai/guided-diffusion) in NHWC layout:

- `timestep_embedding`: the sinusoidal embedding, guided-diffusion's [cos, sin] layout.
- `TimestepEmbedding`: the linear → SiLU → linear MLP on top of it.
- `ResBlock`: GroupNorm → SiLU → conv, timestep conditioning by addition or by AdaGN
  (scale-shift norm, ADM Sec. 3), GroupNorm → SiLU → dropout → zero-initialised conv,
  optional up/down-sampling inside the block (BigGAN-style, ADM Sec. 3).
- `AttentionBlock`: GroupNorm → 1x1 qkv → multi-head self-attention → zero-initialised 1x1.
- `Downsample`, `Upsample`: stride-2 conv or 2x2 average pool; nearest ×2 and optional conv.

Precision: parameters in `param_dtype` (float32), convolutions and attention in `dtype`
(e.g. bfloat16). GroupNorm statistics are always float32 (guided-diffusion's `GroupNorm32`),
and the timestep-conditioning path (sinusoid, MLP, per-block projections) runs in float32,
as in guided-diffusion's fp16 mode, which converts only the convolutions; it is a few
[B, 4·C] matmuls, so it costs nothing.

Initialisation: weights follow PyTorch's default for `nn.Linear`/`nn.Conv` (uniform with
variance 1/(3·fan_in), i.e. kaiming_uniform(a=√5)); biases start at zero (PyTorch draws them
uniformly in ±1/√fan_in); layers guided-diffusion wraps in `zero_module` start at zero.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

NUM_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels).
NORM_EPSILON = 1e-5  # PyTorch GroupNorm's default eps (Flax's default is 1e-6).

# PyTorch's default Linear/Conv weight init: U(±1/√fan_in), variance 1/(3·fan_in).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nn.initializers.zeros_init()


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep embedding, guided-diffusion's layout [cos, sin].

    emb[b, i] = cos(t_b · f_i) and emb[b, half + i] = sin(t_b · f_i) for i < half = dim // 2,
    with f_i = max_period^(−i / half); an odd `dim` gets a trailing zero column.

    Args:
      t: [B] timesteps, int or float (fractional values allowed).
      dim: embedding width.
      max_period: the longest period, 10000 as in Transformers and guided-diffusion.

    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def group_norm(x: jax.Array, *, name: str, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """GroupNorm(32) with float32 statistics and affine, result cast back to `dtype`.

    Must be called from inside a compact `__call__`; the norm becomes a child named `name`.
    """
    norm = nn.GroupNorm(
        num_groups=NUM_GROUPS,
        epsilon=NORM_EPSILON,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        name=name,
    )
    return norm(x.astype(jnp.float32)).astype(dtype)


# The dimension numbers flax's nn.Conv passes for NHWC inputs and HWIO kernels.
_NHWC = ("NHWC", "HWIO", "NHWC")
# Smallest H·W whose 3x3 kernel gradient takes the per-tap contractions on XLA:CPU. Measured
# (2-core CPU, issue 21): at 32x32 they beat XLA's convolution ~4x; at 8x8 (the digits model)
# they made the whole step ~1.6x slower, so smaller maps keep XLA's convolution.
MIN_TAPS_PIXELS = 32 * 32


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """`lax.conv_general_dilated`, with a faster kernel gradient for 3x3 convs on XLA:CPU.

    XLA:CPU lowers the kernel gradient of an unstrided, padded 3x3 NHWC convolution on a
    32x32 map ~10x slower than its forward (the convolution it emits contracts over batch and
    space); here that gradient is nine [C, B·H·W] @ [B·H·W, O] contractions, one per tap,
    which XLA:CPU runs at matmul speed; maps under MIN_TAPS_PIXELS keep XLA's. The forward and
    input gradient stay XLA's convolutions, and every other backend and convolution takes
    `lax.conv_general_dilated` unchanged. Pass it as nn.Conv's `conv_general_dilated`: the
    parameters are nn.Conv's.
    """
    plain = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
    )
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if (
        jax.default_backend() != "cpu"
        or rhs.shape[:2] != (3, 3)
        or lhs.ndim != 4
        or lhs.shape[1] * lhs.shape[2] < MIN_TAPS_PIXELS
        or tuple(window_strides) != (1, 1)
        or [tuple(p) for p in padding] != [(1, 1), (1, 1)]
        or any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation))
        or feature_group_count != 1
        or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc
    ):
        return plain(lhs, rhs)
    return _conv3x3(lhs, rhs, precision)


def _xla_conv3x3(x, kernel, precision):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, kernel, precision):
    return _xla_conv3x3(x, kernel, precision)


def _conv3x3_fwd(x, kernel, precision):
    return _xla_conv3x3(x, kernel, precision), (x, kernel)


def _conv3x3_bwd(precision, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _xla_conv3x3(x, kernel, precision), x)
    (dx,) = input_vjp(g)
    _, height, width, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # dK[i, j] = Σ_{b,h,w} x_pad[b, h+i, w+j, :]ᵀ g[b, h, w, :]
    taps = [
        jnp.einsum(
            "bhwc,bhwo->co",
            xp[:, i : i + height, j : j + width, :],
            g,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        for i in range(3)
        for j in range(3)
    ]
    dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    return dx, dkernel


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour (F.interpolate(scale_factor=2))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, C], 2x2 average pool with stride 2."""
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class TimestepEmbedding(nn.Module):
    """linear → SiLU → linear on a sinusoidal embedding: guided-diffusion's `time_embed`.

    Attributes:
      features: output width, 4 × model_channels in the U-Net.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        """emb: [B, D] sinusoidal embedding -> [B, features]."""
        dense = functools.partial(
            nn.Dense,
            self.features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_init,
        )
        h = dense(name="dense_0")(emb)
        return dense(name="dense_1")(nn.silu(h))


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 (padding 1, as PyTorch) or 2x2 average pool."""

    use_conv: bool
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/2, W/2, out_channels]."""
        channels = x.shape[-1]
        out_channels = self.out_channels or channels
        if not self.use_conv:
            if out_channels != channels:
                raise ValueError(
                    "Downsample: out_channels must equal the input channels when use_conv=False"
                )
            return avg_pool2(x)
        # Explicit ((1, 1), (1, 1)): 'SAME' would pad (0, 1) for stride 2 and shift the taps.
        return nn.Conv(
            out_channels,
            (3, 3),
            strides=(2, 2),
            padding=((1, 1), (1, 1)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_init,
            name="conv",
        )(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour ×2, then an optional 3x3 conv."""

    use_conv: bool
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, 2H, 2W, out_channels]."""
        channels = x.shape[-1]
        out_channels = self.out_channels or channels
        x = upsample_nearest(x)
        if not self.use_conv:
            if out_channels != channels:
                raise ValueError(
                    "Upsample: out_channels must equal the input channels when use_conv=False"
                )
            return x
        return nn.Conv(
            out_channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            conv_general_dilated=conv_general_dilated,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_init,
            name="conv",
        )(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (guided-diffusion's `ResBlock`).

    h = conv3x3(SiLU(GN(x)))                      (resampled after SiLU when up/down)
    h = GN(h)·(1 + scale) + shift                 (use_scale_shift_norm: AdaGN, ADM Sec. 3)
      or GN(h + proj(emb))                        (otherwise)
    h = zero_conv3x3(dropout(SiLU(h)))
    out = skip(x) + h                             (skip: identity, or 1x1 conv if C changes)

    Attributes:
      out_channels: output channels; None keeps the input's.
      dropout: dropout rate on the second conv's input; active only when train=True and
        drawn from the 'dropout' rng stream.
      use_scale_shift_norm: AdaGN conditioning (2·out_channels projection) instead of
        adding a projection of emb.
      up: nearest ×2 upsampling of h (after the first GroupNorm+SiLU) and of the skip.
      down: 2x2 average pooling of h (after the first GroupNorm+SiLU) and of the skip.
    """

    out_channels: int | None = None
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        """x: [B, H, W, C], emb: [B, E] -> [B, H', W', out_channels] (H' = 2H, H/2 or H)."""
        if self.up and self.down:
            raise ValueError("ResBlock: up and down are exclusive")
        channels = x.shape[-1]
        out_channels = self.out_channels or channels
        conv = functools.partial(
            nn.Conv,
            padding=((1, 1), (1, 1)),
            conv_general_dilated=conv_general_dilated,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_init,
        )
        norm = functools.partial(group_norm, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)

        h = nn.silu(norm(x, name="norm_in"))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = conv(out_channels, (3, 3), name="conv_in")(h)

        # Conditioning path in float32 (tiny), cast to the compute dtype at the end.
        emb_features = 2 * out_channels if self.use_scale_shift_norm else out_channels
        emb_out = nn.Dense(
            emb_features,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_init,
            name="emb_proj",
        )(nn.silu(emb.astype(jnp.float32)))
        emb_out = emb_out.astype(self.dtype)[:, None, None, :]  # [B, 1, 1, F]

        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm(h, name="norm_out") * (1 + scale) + shift
        else:
            h = norm(h + emb_out, name="norm_out")
        h = nn.silu(h)
        h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
        h = conv(out_channels, (3, 3), kernel_init=zeros_init, name="conv_out")(h)

        if out_channels != channels:
            x = nn.Conv(
                out_channels,
                (1, 1),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=torch_default_init,
                name="skip",
            )(x)
        return x + h


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: channels // num_head_channels, or num_heads if that is -1."""
    return num_heads if num_head_channels == -1 else channels // num_head_channels


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual (guided-diffusion's `AttentionBlock`).

    out = x + proj_out(attention(qkv(GN(x)))), where qkv is a 1x1 projection to 3C channels
    (a Conv1d with bias in guided-diffusion; a Dense on [B, H·W, C] here) and proj_out a
    zero-initialised 1x1 projection back to C.

    Head split of the 3C qkv channels (it changes only which weight columns feed which head):
      legacy (use_new_attention_order=False, guided-diffusion's default QKVAttentionLegacy):
        channel index = head·3·d + {0: q, 1: k, 2: v}·d + i   -> reshape [.., heads, 3, d]
      new (QKVAttention):
        channel index = {0: q, 1: k, 2: v}·C + head·d + i     -> reshape [.., 3, heads, d]
    The attention output's channel index is head·d + i in both. Scores are q·k/√d with the
    softmax in float32 (guided-diffusion scales q and k by d^(−1/4) each: the same).

    Attributes:
      num_heads: heads, used when num_head_channels == -1.
      num_head_channels: channels per head; overrides num_heads unless -1.
      use_new_attention_order: QKVAttention's split instead of QKVAttentionLegacy's.
      attention_implementation: passed to `jax.nn.dot_product_attention`. None (the default)
        lets JAX choose; in jax 0.10.2 that is always the XLA path. 'cudnn' selects
        cuDNN flash attention on GPU (bf16/fp16 compute only); 'xla' forces XLA.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        batch, height, width, channels = x.shape
        heads = attention_heads(channels, self.num_heads, self.num_head_channels)
        if heads < 1 or channels % heads:
            raise ValueError(
                f"AttentionBlock: {channels} channels cannot be split into {heads} heads"
            )
        head_dim = channels // heads
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_init,
        )
        x = x.astype(self.dtype)
        h = group_norm(x, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)
        h = h.reshape(batch, height * width, channels)
        qkv = dense(3 * channels, name="qkv")(h)  # [B, L, 3C]
        if self.use_new_attention_order:
            qkv = qkv.reshape(batch, height * width, 3, heads, head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            qkv = qkv.reshape(batch, height * width, heads, 3, head_dim)
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        # q, k, v: [B, L, heads, d]
        a = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_implementation)
        a = a.reshape(batch, height * width, channels)
        h = dense(channels, kernel_init=zeros_init, name="proj_out")(a)
        return x + h.reshape(batch, height, width, channels)
