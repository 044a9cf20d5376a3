"""The paper's other datasets at their resolutions, with guided-diffusion's per-resolution defaults.

Each is ADM-BS (Bernoulli timesteps, p = 0.8, t_δ/T = 0.8); set `timesteps.sampler=uniform` for the
ADM baseline. Channel multipliers follow guided-diffusion's `create_model` for the resolution.
"""

from configs import default

# name: (data.name, image_size, model overrides, train overrides)
DATASETS = {
    "celeba64": (
        "celeb_a",
        64,
        dict(
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attention_resolutions=(16, 8),
            num_heads=4,
            num_head_channels=64,
            dropout=0.1,
        ),
        dict(batch_size=128),
    ),
    "imagenet32": (
        "imagenet_resized/32x32",
        32,
        dict(
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=3,
            attention_resolutions=(16, 8),
            num_heads=4,
            dropout=0.0,
        ),
        dict(batch_size=128),
    ),
    "ffhq128": (
        "folder",
        128,
        dict(
            channel_mult=(1, 1, 2, 3, 4),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_head_channels=64,
            dropout=0.1,
        ),
        dict(batch_size=64),
    ),
    "stanford_cars128": (
        "folder",
        128,
        dict(
            channel_mult=(1, 1, 2, 3, 4),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_head_channels=64,
            dropout=0.1,
        ),
        dict(batch_size=64),
    ),
    "celebahq256": (
        "folder",
        256,
        dict(
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_head_channels=64,
            dropout=0.0,
        ),
        dict(batch_size=32),
    ),
    "afhq_dog256": (
        "folder",
        256,
        dict(
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_head_channels=64,
            dropout=0.0,
        ),
        dict(batch_size=32),
    ),
}


def dataset_config(name: str):
    data_name, size, model, train = DATASETS[name]
    c = default.get_config()
    c.data.name = data_name
    c.data.image_size = size
    c.data.channels = 3
    c.data.random_flip = True
    for k, v in model.items():
        c.model[k] = v
    for k, v in train.items():
        c.train[k] = v
    if size >= 128:
        c.optim.lr = 2e-5  # the lower rate guided-diffusion and P2 use at 128² and 256²
        c.model.dtype = "bfloat16"
    c.timesteps.sampler = "bernoulli"
    c.timesteps.t_delta = 800
    c.timesteps.p = 0.8
    return c
