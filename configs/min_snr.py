"""ADM-BS with Min-SNR-γ weighting (Hang et al. 2023, γ = 5); the paper's Table 2.

ddpm-bs --config=configs/min_snr.py:cifar10_adm_bs --workdir=runs/min_snr
"""

import importlib


def get_config(base: str = "digits"):
    c = importlib.import_module(f"configs.{base}").get_config()
    c.loss.weighting = "min_snr"
    c.loss.min_snr_gamma = 5.0
    return c
