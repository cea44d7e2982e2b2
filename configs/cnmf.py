"""CNMF: convolutional NMF modules, no 1x1 mixing (paper: 81.5 %).

python train.py --config configs/cnmf.py --workdir runs/cnmf
"""

from nmfjax.configuration import default_config


def get_config():
    config = default_config()
    config.model.architecture = "cnmf"
    return config
