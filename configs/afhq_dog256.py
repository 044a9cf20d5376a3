"""ADM-BS on afhq_dog256 (see _datasets.py for the model and the data source).

ddpm-bs --config=configs/afhq_dog256.py --workdir=runs/afhq_dog256 --config.data.folder=/data/afhq_dog256
"""

from configs import _datasets


def get_config():
    return _datasets.dataset_config("afhq_dog256")
