"""FLOP per training image: the hand-counted reference figure where it applies, XLA's otherwise.

The reference (55.6 GFLOP per image, forward + backward, padded convolution count) was counted
on one network, the paper's CIFAR-10 ADM (57.09 M parameters). It holds for a config only when
every field that shapes that network's arithmetic is equal, whatever the config file is called;
any other model gets XLA's cost analysis of the compiled step. XLA skips conv taps that fall on
zero padding, so on the reference network it counts 52.3, not 55.6.
"""

from __future__ import annotations

REFERENCE_GFLOP = 55.6
# The network REFERENCE_GFLOP was counted on, as (section, field) -> value of a ddpm_bs config.
REFERENCE_NETWORK = {
    ("data", "image_size"): 32,
    ("data", "channels"): 3,
    ("model", "model_channels"): 128,
    ("model", "channel_mult"): (1, 2, 2, 2),
    ("model", "num_res_blocks"): 3,
    ("model", "attention_resolutions"): (16, 8),
    ("model", "num_heads"): 4,
    ("model", "num_head_channels"): -1,
    ("model", "use_scale_shift_norm"): True,
    ("model", "resblock_updown"): True,
    ("model", "learn_sigma"): True,
    ("model", "num_classes"): 0,
}


def is_reference_network(config) -> bool:
    """Whether `config` builds exactly the network the reference figure was counted on."""
    for (section, field), value in REFERENCE_NETWORK.items():
        got = config[section][field]
        if (tuple(got) if isinstance(got, (list, tuple)) else got) != value:
            return False
    return True


def gflop_per_img(config, xla_gflop: float | None) -> tuple[float | None, str]:
    """(GFLOP per training image, its source: 'reference' or 'xla')."""
    if is_reference_network(config):
        return REFERENCE_GFLOP, "reference"
    return xla_gflop, "xla"
