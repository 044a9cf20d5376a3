"""The built-in quick start: a small ADM U-Net with DDPM-BS timesteps on scikit-learn's digits.

Trains at the digits' native 8×8 (set data.image_size to upsample; 16×16 costs 4× the compute)
and produces recognisable digits in under 10 minutes on a 2-core CPU:

    ddpm-bs --config=configs/digits.py --workdir=runs/digits
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "digits"
    c.data.image_size = 8
    c.data.channels = 1
    c.data.random_flip = False  # digits are not mirror-symmetric
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.num_heads = 1
    c.model.dropout = 0.0
    c.model.learn_sigma = False
    c.diffusion.schedule = "cosine"
    c.timesteps.sampler = "bernoulli"  # DDPM-BS: p = 0.8 on the first t_δ/T = 0.8 of the steps.
    c.timesteps.t_delta = 800
    c.timesteps.p = 0.8
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.train.batch_size = 64
    c.train.num_steps = 1500
    c.train.ema_rates = (0.995,)
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.sample_every = 500
    c.train.num_samples = 64
    c.train.sample_steps = 50
    return c
