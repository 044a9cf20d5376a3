"""ADM-BS on imagenet32 (see _datasets.py for the model and the data source).

ddpm-bs --config=configs/imagenet32.py --workdir=runs/imagenet32 --config.data.data_dir=/data/tfds
"""

from configs import _datasets


def get_config():
    return _datasets.dataset_config("imagenet32")
