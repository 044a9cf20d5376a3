"""ADM-BS with the Debias weighting (Yu et al. 2024, λ = 1/√SNR); the paper's Table 2.

ddpm-bs --config=configs/debias.py:cifar10_adm_bs --workdir=runs/debias
"""

import importlib


def get_config(base: str = "digits"):
    c = importlib.import_module(f"configs.{base}").get_config()
    c.loss.weighting = "debias"
    return c
