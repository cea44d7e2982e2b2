"""CNN+1x1: convolutions, each followed by a 1x1 mixing convolution.

python train.py --config configs/cnn_1x1.py --workdir runs/cnn_1x1
"""

from nmfjax.configuration import default_config


def get_config():
    config = default_config()
    config.model.architecture = "cnn_1x1"
    return config
