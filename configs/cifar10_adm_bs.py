"""The paper's ADM-BS on CIFAR-10: the ADM baseline with Bernoulli timesteps (p = 0.8, t_δ/T = 0.8).

ddpm-bs --config=configs/cifar10_adm_bs.py --workdir=runs/cifar10_adm_bs --config.data.data_dir=/data/tfds
"""

from configs import cifar10_adm


def get_config():
    c = cifar10_adm.get_config()
    c.timesteps.sampler = "bernoulli"
    c.timesteps.t_delta = 800  # t_δ/T = 0.8 (paper §4.4)
    c.timesteps.p = 0.8
    return c
