"""The `model` config section, read into the U-Net it describes.

    model = spec.ModelSpec.from_config(config.model).build(image_size=32, in_channels=3)

`ModelSpec` checks each field's type; `unet.check_config` checks how they fit together (levels
that divide the image, GroupNorm widths, heads that divide the channels), and its errors name
the config field (`data.image_size` for the image the model must downsample).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ddpm_bs import fields
from ddpm_bs.models import unet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The ADM U-Net's settings (configs/default.py documents each)."""

    model_channels: int = 128
    channel_mult: tuple[float, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.3
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    learn_sigma: bool = True
    num_classes: int = 0
    dtype: str = "float32"
    attention_implementation: str | None = None

    RULES: ClassVar[dict[str, fields.Check]] = {
        "model_channels": fields.integer(1),
        "channel_mult": fields.tuple_of(
            fields.real(0, low_open=True), "numbers > 0", non_empty=True
        ),
        "num_res_blocks": fields.integer(1),
        "attention_resolutions": fields.tuple_of(
            fields.integer(1), "resolutions in pixels", non_empty=False
        ),
        "num_heads": fields.integer(1),
        "num_head_channels": fields.integer(1, or_minus_one=True),
        "dropout": fields.real(0, 1, high_open=True),
        "use_scale_shift_norm": fields.boolean,
        "resblock_updown": fields.boolean,
        "use_new_attention_order": fields.boolean,
        "learn_sigma": fields.boolean,
        "num_classes": fields.integer(0),
        "dtype": fields.one_of(*unet.DTYPES),
        "attention_implementation": fields.one_of(*unet.ATTENTION_IMPLEMENTATIONS),
    }
    # unet.UNet's arguments that other sections hold.
    _PATHS: ClassVar[dict[str, str]] = {
        "image_size": "data.image_size",
        "in_channels": "data.channels",
        "num_heads_upsample": "model.num_heads",  # −1: num_heads on the way up
    }

    @classmethod
    def from_config(cls, cfg) -> ModelSpec:
        spec = cls(**fields.read(cfg, "model", cls.RULES))
        if spec.attention_implementation == "cudnn" and spec.dtype != "bfloat16":
            fields.fail(
                "model.attention_implementation",
                "cudnn",
                f"cuDNN flash attention needs bf16 compute, but model.dtype={spec.dtype!r}",
                "set --config.model.dtype=bfloat16, or model.attention_implementation to None "
                "or 'xla'",
            )
        return spec

    def build(self, *, image_size: int, in_channels: int, config=None) -> unet.UNet:
        """The U-Net for images [image_size, image_size, in_channels], checked.

        `config` (the whole config) lets errors quote the offending field's value.
        """
        try:
            model = unet.UNet(
                image_size=image_size,
                in_channels=in_channels,
                model_channels=self.model_channels,
                learn_sigma=self.learn_sigma,
                num_res_blocks=self.num_res_blocks,
                attention_resolutions=tuple(self.attention_resolutions),
                dropout=self.dropout,
                channel_mult=tuple(self.channel_mult),
                num_classes=self.num_classes or None,
                num_heads=self.num_heads,
                num_head_channels=self.num_head_channels,
                use_scale_shift_norm=self.use_scale_shift_norm,
                resblock_updown=self.resblock_updown,
                use_new_attention_order=self.use_new_attention_order,
                dtype=unet.DTYPES[self.dtype],
                attention_implementation=self.attention_implementation,
            )
            unet.check_config(model)
        except fields.InvalidArgument as e:
            paths = {name: f"model.{name}" for name in self.RULES} | self._PATHS
            if config is None:
                config = {
                    "model": dataclasses.asdict(self),
                    "data": {"image_size": image_size, "channels": in_channels},
                }
            raise fields.reword(e, paths, config, section="model") from None
        return model
