"""CNN: convolutions over L1-normalised patches, no 1x1 mixing (paper: 81.0 %).

python train.py --config configs/cnn.py --workdir runs/cnn
"""

from nmfjax.configuration import default_config


def get_config():
    config = default_config()
    config.model.architecture = "cnn"
    return config
