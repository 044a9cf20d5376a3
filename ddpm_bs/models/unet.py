"""The ADM U-Net (Dhariwal & Nichol 2021), guided-diffusion's `UNetModel` in Flax, NHWC.

Structure (L = len(channel_mult) levels, ch_l = channel_mult[l] · model_channels):

  emb = MLP(sinusoid(t)) [+ Embed(y)]                            [B, 4·model_channels]
  in_conv 3x3 -> ch_0
  down, level l:   num_res_blocks × (ResBlock -> ch_l [+ Attention if resolution listed])
                   then, except at the last level, a down ResBlock (resblock_updown) or
                   Downsample; every output above is kept for a skip connection
  middle:          ResBlock, Attention, ResBlock
  up, level l (reversed): (num_res_blocks + 1) × (concat skip; ResBlock -> ch_l
                   [+ Attention]), then, except at level 0, an up ResBlock or Upsample
  out:             GroupNorm -> SiLU -> zero-initialised conv 3x3 -> out_channels (float32)

`attention_resolutions` are given in pixels (guided-diffusion's command line, e.g. "16,8")
and converted to downsampling rates image_size // r internally (what `UNetModel` takes).

Example (the paper's CIFAR-10 model, 57.09 M parameters as in PyTorch):

  model = unet.UNet(image_size=32, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
                    attention_resolutions=(16, 8), dropout=0.3, learn_sigma=True,
                    dtype=jnp.bfloat16)
  variables = model.init({"params": key}, x, t, train=False)
  out = model.apply(variables, x, t, train=True, rngs={"dropout": dropout_key})
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_bs import fields
from ddpm_bs.models import layers

Dtype = Any

# guided-diffusion's script_util.create_model defaults for channel_mult="".
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # model.dtype names


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """guided-diffusion's per-resolution channel multipliers; ValueError for other sizes."""
    if image_size not in _DEFAULT_CHANNEL_MULT:
        raise ValueError(
            f"image_size={image_size} has no default channel_mult (defaults exist for "
            f"{sorted(_DEFAULT_CHANNEL_MULT)}); set channel_mult explicitly"
        )
    return _DEFAULT_CHANNEL_MULT[image_size]


class UNet(nn.Module):
    """guided-diffusion's `UNetModel` (ADM) with its defaults; see the module docstring.

    Attributes:
      image_size: input height and width in pixels.
      in_channels: input channels.
      model_channels: base width; level l has channel_mult[l] · model_channels channels.
      out_channels: output channels; None means in_channels, or 2·in_channels when
        learn_sigma (ε and the interpolation v of the variance, improved DDPM Eq. 15).
      learn_sigma: whether the model also outputs the variance interpolation.
      num_res_blocks: ResBlocks per level on the way down (one more on the way up).
      attention_resolutions: resolutions in pixels at which attention is used.
      dropout: dropout rate inside every ResBlock.
      channel_mult: per-level multipliers; None takes `default_channel_mult(image_size)`.
      conv_resample: learned 3x3 convs in Downsample/Upsample (unused if resblock_updown).
      num_classes: class-conditional with this many classes (nn.Embed added to emb).
      num_heads: attention heads (when num_head_channels == -1).
      num_head_channels: channels per head; overrides num_heads unless -1.
      num_heads_upsample: heads on the upsampling path; -1 means num_heads.
      use_scale_shift_norm: AdaGN conditioning in the ResBlocks.
      resblock_updown: ResBlocks with built-in resampling instead of Downsample/Upsample.
      use_new_attention_order: QKVAttention's qkv split instead of the legacy one.
      attention_implementation: for `jax.nn.dot_product_attention`: None (JAX's choice,
        which is XLA in jax 0.10.2), 'xla', or 'cudnn' (flash attention on GPU, bf16/fp16
        compute only).
      remat: rematerialise each ResBlock and AttentionBlock in the backward pass (memory
        for compute; guided-diffusion's use_checkpoint).
      dtype: compute dtype (e.g. jnp.bfloat16); norms, conditioning and output in float32.
      param_dtype: parameter dtype.
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int | None = None
    learn_sigma: bool = False
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] | None = None
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    attention_implementation: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        check_config(self)

    @property
    def resolved_channel_mult(self) -> tuple[float, ...]:
        """channel_mult, or guided-diffusion's default for image_size when it is None."""
        if self.channel_mult is None:
            return default_channel_mult(self.image_size)
        return tuple(self.channel_mult)

    @property
    def output_channels(self) -> int:
        """Channels of the output: out_channels, else in_channels × (2 if learn_sigma)."""
        if self.out_channels is not None:
            return self.out_channels
        return self.in_channels * (2 if self.learn_sigma else 1)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        """Predict from a noisy batch.

        Args:
          x: [B, H, W, in_channels] noisy images.
          t: [B] timesteps (int indices or float).
          y: [B] int class labels; required iff num_classes is set.
          train: enables dropout (drawn from the 'dropout' rng stream).

        Returns:
          [B, H, W, output_channels] float32.
        """
        if (y is None) != (self.num_classes is None):
            raise ValueError("UNet: pass y if and only if num_classes is set")
        channel_mult = self.resolved_channel_mult
        attention_ds = {self.image_size // r for r in self.attention_resolutions}
        emb_dim = 4 * self.model_channels
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        res_cls = nn.remat(layers.ResBlock, static_argnums=(3,)) if self.remat else layers.ResBlock
        attn_cls = nn.remat(layers.AttentionBlock) if self.remat else layers.AttentionBlock
        res_block = functools.partial(
            res_cls,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            **common,
        )
        attn_block = functools.partial(
            attn_cls,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
            attention_implementation=self.attention_implementation,
            **common,
        )
        num_heads_upsample = (
            self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        )

        # Conditioning, in float32 (see layers.py).
        emb = layers.TimestepEmbedding(emb_dim, param_dtype=self.param_dtype, name="time_embed")(
            layers.timestep_embedding(t, self.model_channels)
        )
        if self.num_classes is not None:
            emb = emb + nn.Embed(
                self.num_classes,
                emb_dim,
                embedding_init=nn.initializers.normal(stddev=1.0),  # PyTorch nn.Embedding
                param_dtype=self.param_dtype,
                name="label_embed",
            )(y)

        h = nn.Conv(
            int(channel_mult[0] * self.model_channels),
            (3, 3),
            padding=((1, 1), (1, 1)),
            conv_general_dilated=layers.conv_general_dilated,
            kernel_init=layers.torch_default_init,
            name="in_conv",
            **common,
        )(x.astype(self.dtype))
        skips = [h]
        ds = 1
        for level, mult in enumerate(channel_mult):
            ch = int(mult * self.model_channels)
            for i in range(self.num_res_blocks):
                h = res_block(out_channels=ch, name=f"down{level}_res{i}")(h, emb, train)
                if ds in attention_ds:
                    h = attn_block(num_heads=self.num_heads, name=f"down{level}_attn{i}")(h)
                skips.append(h)
            if level != len(channel_mult) - 1:
                if self.resblock_updown:
                    h = res_block(down=True, name=f"down{level}_resample")(h, emb, train)
                else:
                    h = layers.Downsample(
                        self.conv_resample, name=f"down{level}_resample", **common
                    )(h)
                skips.append(h)
                ds *= 2

        h = res_block(name="mid_res0")(h, emb, train)
        h = attn_block(num_heads=self.num_heads, name="mid_attn")(h)
        h = res_block(name="mid_res1")(h, emb, train)

        for level, mult in reversed(list(enumerate(channel_mult))):
            ch = int(mult * self.model_channels)
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(out_channels=ch, name=f"up{level}_res{i}")(h, emb, train)
                if ds in attention_ds:
                    h = attn_block(num_heads=num_heads_upsample, name=f"up{level}_attn{i}")(h)
            if level:
                if self.resblock_updown:
                    h = res_block(up=True, name=f"up{level}_resample")(h, emb, train)
                else:
                    h = layers.Upsample(self.conv_resample, name=f"up{level}_resample", **common)(h)
                ds //= 2

        # Output head in float32, as guided-diffusion (h.type(x.dtype) before self.out).
        h = layers.group_norm(h, name="out_norm", dtype=jnp.float32, param_dtype=self.param_dtype)
        h = nn.Conv(
            self.output_channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=layers.zeros_init,
            name="out_conv",
        )(nn.silu(h))
        return h


def _fail(field: str, message: str) -> None:
    raise fields.InvalidArgument(field, f"UNet.{field}: {message}")


def check_config(model: UNet) -> None:
    """Raise ValueError naming the offending field if `model` cannot be built as configured.

    Called by `UNet.__post_init__`, so a bad configuration fails at construction.
    """
    if model.image_size < 1:
        _fail("image_size", f"must be positive, got {model.image_size}")
    if model.in_channels < 1:
        _fail("in_channels", f"must be positive, got {model.in_channels}")
    if model.channel_mult is None and model.image_size not in _DEFAULT_CHANNEL_MULT:
        _fail(
            "channel_mult",
            f"None, and image_size={model.image_size} has no default (defaults exist for "
            f"{sorted(_DEFAULT_CHANNEL_MULT)}); set it explicitly",
        )
    channel_mult = model.resolved_channel_mult
    if not channel_mult:
        _fail("channel_mult", "must have at least one level")
    num_levels = len(channel_mult)
    factor = 2 ** (num_levels - 1)
    if model.image_size % factor:
        _fail(
            "image_size",
            f"{model.image_size} is not divisible by 2^(len(channel_mult) - 1) = {factor}, "
            f"so {num_levels} levels cannot downsample it",
        )
    if model.model_channels < 1 or model.model_channels % layers.NUM_GROUPS:
        _fail(
            "model_channels",
            f"{model.model_channels} is not a positive multiple of {layers.NUM_GROUPS} "
            "(GroupNorm with 32 groups)",
        )
    level_channels = [int(m * model.model_channels) for m in channel_mult]
    for mult, ch in zip(channel_mult, level_channels, strict=True):
        if ch < 1 or ch % layers.NUM_GROUPS:
            _fail(
                "channel_mult",
                f"multiplier {mult} gives {ch} channels, not a positive multiple of "
                f"{layers.NUM_GROUPS} (GroupNorm with 32 groups)",
            )
    if model.num_res_blocks < 0:
        _fail("num_res_blocks", f"must be non-negative, got {model.num_res_blocks}")
    if not 0.0 <= model.dropout < 1.0:
        _fail("dropout", f"must be in [0, 1), got {model.dropout}")
    if model.num_classes is not None and model.num_classes < 1:
        _fail("num_classes", f"must be None or positive, got {model.num_classes}")
    if model.out_channels is not None:
        if model.out_channels < 1:
            _fail("out_channels", f"must be positive, got {model.out_channels}")
        if model.learn_sigma and model.out_channels != 2 * model.in_channels:
            _fail(
                "out_channels",
                f"learn_sigma needs 2 * in_channels = {2 * model.in_channels}, "
                f"got {model.out_channels}",
            )
    if model.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
        _fail(
            "attention_implementation",
            f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {model.attention_implementation!r}",
        )

    reachable = [model.image_size // 2**level for level in range(num_levels)]
    for r in model.attention_resolutions:
        if r not in reachable:
            _fail(
                "attention_resolutions",
                f"resolution {r} is never reached; the model's resolutions are {reachable}",
            )

    # Channels of every attention layer: listed levels on both paths, and the middle block.
    attn_levels = {reachable.index(r) for r in model.attention_resolutions}
    down_channels = {level_channels[lvl] for lvl in attn_levels} | {level_channels[-1]}
    up_channels = {level_channels[lvl] for lvl in attn_levels}
    if model.num_head_channels != -1:
        if model.num_head_channels < 1:
            _fail("num_head_channels", f"must be -1 or positive, got {model.num_head_channels}")
        for ch in sorted(down_channels | up_channels):
            if ch % model.num_head_channels:
                _fail(
                    "num_head_channels",
                    f"{model.num_head_channels} does not divide the {ch} channels of an "
                    "attention layer",
                )
        return
    for field, heads, channels in (
        ("num_heads", model.num_heads, down_channels),
        (
            "num_heads_upsample",
            model.num_heads if model.num_heads_upsample == -1 else model.num_heads_upsample,
            up_channels,
        ),
    ):
        if heads < 1:
            _fail(field, f"must be positive, got {heads}")
        for ch in sorted(channels):
            if ch % heads:
                _fail(field, f"{heads} heads do not divide the {ch} channels of an attention layer")


def example_inputs(
    model: UNet, batch_size: int = 1
) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct | None]:
    """Abstract (x, t, y) for `model`: [B, S, S, in_channels] float32, [B] int32, [B] int32."""
    x = jax.ShapeDtypeStruct(
        (batch_size, model.image_size, model.image_size, model.in_channels), jnp.float32
    )
    t = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    y = None if model.num_classes is None else jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return x, t, y


def abstract_params(model: UNet) -> Any:
    """The parameter pytree as ShapeDtypeStructs, via `jax.eval_shape` (nothing is computed)."""

    def init(key, x, t, y):
        return model.init({"params": key}, x, t, y, train=False)["params"]

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)  # a typed key, abstractly
    return jax.eval_shape(init, key, *example_inputs(model))


def parameter_count(params: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def flops_per_image(
    model: UNet,
    image_size: int | None = None,
    channels: int | None = None,
    *,
    batch_size: int = 8,
    backward: bool = True,
) -> float:
    """XLA's FLOP count per image of one training step's forward (+ backward) pass.

    Compiles (without running) the gradient of a mean-squared loss on the model's output,
    with dropout on, for a batch of `batch_size`, and divides XLA's `cost_analysis()` FLOPs
    by it. Counts are the compiled program's (multiply-add = 2 FLOPs), on the current
    backend; backends may fuse or count differently. XLA leaves out the taps of a conv that
    fall on zero padding, so it counts less than a padded count does: on CPU the CIFAR-10
    ADM model gives 52.3 GFLOP (17.5 forward), where the padded conv count behind the
    reference 55.6 GFLOP is 3 × 18.53.

    Args:
      model: the U-Net; `image_size` and `channels` default to its own.
      image_size: spatial size of the input.
      channels: input channels.
      batch_size: images per step; parameter-gradient reductions amortise over it.
      backward: count forward + backward (the training cost); False: forward only.
    """
    image_size = model.image_size if image_size is None else image_size
    channels = model.in_channels if channels is None else channels
    model = model.clone(image_size=image_size, in_channels=channels)
    x, t, y = example_inputs(model, batch_size)
    params = abstract_params(model)

    def loss(params, x, t, y, key):
        out = model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": key})
        return jnp.mean(jnp.square(out))

    fn = jax.grad(loss) if backward else loss
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = jax.jit(fn).lower(params, x, t, y, key).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / batch_size
