"""ADM-BS on ffhq128 (see _datasets.py for the model and the data source).

ddpm-bs --config=configs/ffhq128.py --workdir=runs/ffhq128 --config.data.folder=/data/ffhq128
"""

from configs import _datasets


def get_config():
    return _datasets.dataset_config("ffhq128")
