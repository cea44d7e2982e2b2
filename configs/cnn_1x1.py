"""CNN+1x1: convolutions, each followed by a 1x1 mixing convolution.

    python train.py --config configs/cnn_1x1.py --workdir runs/cnn_1x1
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "cnn_1x1"
    return config
