"""CNMF+1x1: convolutional NMF, each followed by a 1x1 mixing convolution (paper: 85.1 %).

python train.py --config configs/cnmf_1x1.py --workdir runs/cnmf_1x1
"""

from nmfjax.configuration import default_config


def get_config():
    config = default_config()
    config.model.architecture = "cnmf_1x1"
    return config
