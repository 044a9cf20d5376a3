"""ADM-BS on stanford_cars128 (see _datasets.py for the model and the data source).

ddpm-bs --config=configs/stanford_cars128.py --workdir=runs/stanford_cars128 --config.data.folder=/data/stanford_cars128
"""

from configs import _datasets


def get_config():
    return _datasets.dataset_config("stanford_cars128")
