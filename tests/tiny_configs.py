"""Tiny configs: the paper's networks with a small, fast recipe for tests.

Apart from tests/conftest.py, which also sets the suite's XLA flags: a child process builds the same
configs under the flags it was given (tests/test_training.py's steps_per_call check, XLA's own).
"""


def tiny_config(model="cnmf_1x1", **overrides):
    """A model config with a small, fast recipe for tests."""
    from nmfjax import configuration

    config = configuration.default_config()
    config.model.architecture = model
    config.batch_size = 10
    config.eval_batch_size = 10
    config.model.nmf.iterations = 3
    config.num_epochs = 1
    config.log_every_steps = 1
    return configuration.apply_overrides(config, overrides)
