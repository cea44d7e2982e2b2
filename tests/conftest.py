"""Shared fixtures: the real CIFAR-10 subset beside the checkout, and tiny configs."""

import pathlib

import pytest

SHARED_TFDS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tfds"


@pytest.fixture
def shared_tfds() -> str:
    if not (SHARED_TFDS / "cifar10").is_dir():
        pytest.skip(f"the CIFAR-10 subset is not at {SHARED_TFDS} (../shared/tfds beside the checkout; CI has it)")
    return str(SHARED_TFDS)


def tiny_config(model="cnmf_1x1", **overrides):
    """A model config with a small, fast recipe for tests."""
    from configs import default
    from nmfjax import training

    config = default.get_config()
    config.model = model
    config.batch_size = 10
    config.eval_batch_size = 10
    config.nmf.iterations = 3
    config.num_epochs = 1
    config.log_every_steps = 1
    return training.apply_overrides(config, overrides)
