"""Any config shrunk to run in seconds on a CPU (`default.smoke`): a dry run before a long job.

ddpm-bs --config=configs/smoke.py --workdir=/tmp/smoke                      # digits
ddpm-bs --config=configs/smoke.py:cifar10_adm_bs --workdir=/tmp/smoke       # another base
"""

import importlib

from configs import default


def get_config(base: str = "digits"):
    return default.smoke(importlib.import_module(f"configs.{base}").get_config())
