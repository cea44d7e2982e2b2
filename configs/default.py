"""Defaults shared by the four networks: the paper's recipe (SPEC sections 3 and 4).

The model configs (cnn.py, cnmf.py, cnn_1x1.py, cnmf_1x1.py) start from this one.
Any field can be overridden on the command line, e.g.

    python train.py --config configs/cnmf_1x1.py --config.num_epochs=3 --config.data_dir=../shared/tfds
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model (SPEC section 3): four blocks, one entry per block in each tuple.
    config.model = "cnmf_1x1"  # "cnn" | "cnmf" | "cnn_1x1" | "cnmf_1x1"
    config.kernel_sizes = (5, 5, 0, 1)  # 0: the whole remaining map (4x4 for CIFAR-10)
    config.features = (32, 64, 96, 10)
    config.pooling = (True, True, False, False)  # 2x2 average pooling after the block
    config.batch_norm = (True, True, False, False)  # only while the map is larger than 1x1
    config.groups = (1, 1, 1, 1)  # groups of module a (NMF or convolution)
    config.mix_groups = (1, 1, 1, 1)  # groups of the 1x1 mixing convolution
    config.width = 1  # multiplies the outputs of every block but the last (paper's sweep: 1, 2, 4, 8)
    config.batch_norm_statistics = "batch"  # "batch": as the authors, also in evaluation | "running"

    # The NMF op (SPEC section 1).
    config.nmf = ml_collections.ConfigDict()
    config.nmf.iterations = 20
    config.nmf.epsilon = config_dict.placeholder(float)  # None: the pure update
    config.nmf.gradient = "approx"  # "approx" | "unrolled" | "implicit"
    config.nmf.learning = "backprop"  # "backprop" | "local_kl" | "local_mse"
    config.nmf.readout_learning = config_dict.placeholder(str)  # the last block's NMF layer; None: as learning
    config.nmf.adjoint_iterations = config_dict.placeholder(int)  # "implicit" only; None: iterations

    # Data (SPEC section 4).
    config.dataset = "cifar10"  # "cifar10" | "mnist" | "fashion_mnist"
    config.data_dir = config_dict.placeholder(str)  # TFDS data directory; None: tfds's default
    config.download = True  # download and prepare a missing dataset (needs network and TensorFlow)
    config.crop_size = config_dict.placeholder(int)  # None: the dataset's default (28 CIFAR, 24 MNIST)
    config.num_train_examples = config_dict.placeholder(int)  # None: the whole train split
    config.augment = ml_collections.ConfigDict(
        dict(flip=True, brightness=0.5, contrast=0.1, saturation=0.1, hue=0.15)
    )

    # Optimisation (SPEC section 4).
    config.batch_size = 50
    config.eval_batch_size = 50  # with "batch" statistics the eval batch size changes the results
    config.num_epochs = 500
    config.learning_rates = ml_collections.ConfigDict(dict(module_a=0.01, mixing=0.001, batch_norm=0.001))
    config.plateau = ml_collections.ConfigDict(dict(metric="train_loss", factor=0.1, patience=10, rtol=1e-4))
    config.min_learning_rate = 1e-9  # stop when every learning rate is below this
    config.seed = 0

    # Bookkeeping.
    config.checkpoints_to_keep = 3  # the latest ones; the best by test accuracy is kept as well
    config.log_every_steps = 20
    config.distributed = False  # call jax.distributed.initialize() first (multi-host)
    return config
