"""ADM-BS on celeba64 (see _datasets.py for the model and the data source).

ddpm-bs --config=configs/celeba64.py --workdir=runs/celeba64 --config.data.data_dir=/data/tfds
"""

from configs import _datasets


def get_config():
    return _datasets.dataset_config("celeba64")
