"""CNN: convolutions over L1-normalised patches, no 1x1 mixing (paper: 81.0 %).

    python train.py --config configs/cnn.py --workdir runs/cnn
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "cnn"
    return config
