"""CNMF whose hidden NMF layers learn by the local NMF rule instead of backprop (paper section 4.2: about 32 %).

    python train.py --config configs/cnmf_local.py --workdir runs/cnmf_local
    python train.py --config configs/cnmf_local.py --workdir runs/cnmf_local_mse --config.model.nmf.learning=local_mse

The weight gradient of the NMF layers of blocks 1-3 is the local NMF rule
(``local_kl``, from the KL update of paper eq. 4, or ``local_mse``, summed over
positions); their input gradients still follow the approx backward, so
BatchNorm and the last block's NMF layer, the classifier, learn by backprop.
With ``--config.model.readout_learning=local_kl`` the classifier learns locally
too: then no weight sees the labels and the accuracy stays at chance.
"""

from nmfjax.configuration import default_config


def get_config():
    config = default_config()
    config.model.architecture = "cnmf"
    config.model.nmf.learning = "local_kl"  # "local_kl" | "local_mse": blocks 1-3
    config.model.readout_learning = "backprop"  # block 4, the classifier
    return config
