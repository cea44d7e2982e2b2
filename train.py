"""Trains one of the paper's networks.

    python train.py --config configs/cnmf_1x1.py --workdir runs/cnmf_1x1 \
        --config.data_dir=../shared/tfds --config.num_epochs=3

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (default: runs/<model>).")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    import jax

    if FLAGS.config.distributed:
        jax.distributed.initialize()
    from nmfjax import training

    training.train_and_evaluate(FLAGS.config, FLAGS.workdir or f"runs/{FLAGS.config.model}")


if __name__ == "__main__":
    app.run(main)
