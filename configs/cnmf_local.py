"""CNMF whose NMF weights learn by the local NMF rule instead of backprop (paper section 4.2: about 32 %).

    python train.py --config configs/cnmf_local.py --workdir runs/cnmf_local
    python train.py --config configs/cnmf_local.py --workdir runs/cnmf_local_mse --config.nmf.learning=local_mse

Every NMF layer's weight gradient is SPEC's reconstruction rule (``local_kl``
or ``local_mse``, summed over positions); the input gradients still follow the
approx backward, so BatchNorm (and, with model=cnmf_1x1, the 1x1 mixing
convolutions) learn by backprop.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "cnmf"
    config.nmf.learning = "local_kl"  # "local_kl" | "local_mse"
    return config
