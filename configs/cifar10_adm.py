"""The paper's CIFAR-10 baseline: ADM (improved-DDPM U-Net, 57.09 M parameters), uniform timesteps.

Reads CIFAR-10 prepared in array_record form in a tfds data_dir:

    ddpm-bs --config=configs/cifar10_adm.py --workdir=runs/cifar10_adm --config.data.data_dir=/data/tfds
"""

from configs import default


def get_config():
    c = default.get_config()  # default.py holds exactly the paper's CIFAR-10 ADM settings.
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True
    return c
