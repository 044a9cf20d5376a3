"""ADM-BS with P2 weighting (Choi et al. 2022: λ = 1/(k + SNR)^γ, k = 1, γ = 1); the paper's Table 2.

ddpm-bs --config=configs/p2.py --workdir=runs/p2
ddpm-bs --config=configs/p2.py:cifar10_adm_bs --workdir=runs/p2_cifar   # on another base config
"""

import importlib


def get_config(base: str = "digits"):
    c = importlib.import_module(f"configs.{base}").get_config()
    c.loss.weighting = "p2"
    c.loss.p2_k = 1.0
    c.loss.p2_gamma = 1.0
    return c
