"""ADM-BS on celebahq256 (see _datasets.py for the model and the data source).

ddpm-bs --config=configs/celebahq256.py --workdir=runs/celebahq256 --config.data.folder=/data/celebahq256
"""

from configs import _datasets


def get_config():
    return _datasets.dataset_config("celebahq256")
