"""CNMF: convolutional NMF modules, no 1x1 mixing (paper: 81.5 %).

    python train.py --config configs/cnmf.py --workdir runs/cnmf
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "cnmf"
    return config
