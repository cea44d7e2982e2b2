r"""Trains one of the paper's networks.

    python train.py --config configs/cnmf_1x1.py --workdir runs/cnmf_1x1 \
        --config.data_dir=../shared/tfds --config.num_epochs=3

Every field of the config is set as --config.FIELD=VALUE; --show_config lists
them with their values and meaning. Rerunning the same command resumes from the
workdir's newest checkpoint; --start_over moves a previous run aside and starts
from scratch. Ctrl-C (or SIGTERM) stops at the next step, after any save in
progress.
"""

import contextlib
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nmfjax import cli
from nmfjax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string(
    "workdir", None, "Where config.json, metrics.jsonl, checkpoints/ and tensorboard/ go (default: runs/<model>)."
)
flags.DEFINE_bool("start_over", False, "Move a previous run in the workdir to WORKDIR.replaced-TIME, then train.")
flags.DEFINE_bool(
    "show_config",
    False,
    "Print every field of the config (with your --config.FIELD=VALUE overrides), its value and meaning; no training.",
)


def _config_argument(argv):
    """The value of ``--config`` as given (``--config=F`` or ``--config F``), else None."""
    for index, argument in enumerate(argv):
        if argument.startswith("--config="):
            return argument.split("=", 1)[1]
        if argument == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def parse_flags(argv):
    """absl's flag parsing, with every mistake reported as one line (cli.fail)."""
    # Checked before parsing: ml_collections loads the file while it parses any --config.FIELD override,
    # and a missing file then surfaces as an OSError traceback.
    config_file = _config_argument(argv[1:])
    if config_file is not None and not pathlib.Path(config_file.split(":")[0]).is_file():
        cli.fail(f"config file {config_file} does not exist; the configs are in configs/, e.g. configs/cnmf_1x1.py.")
    remaining = cli.parse_flags(FLAGS, argv)
    if FLAGS.config is None:
        cli.fail("--config is required, e.g. python train.py --config configs/cnmf_1x1.py")
    return remaining


def main(argv):
    """Trains ``--config``'s network into ``--workdir``; a mistake of the user's is one ``error:`` line."""
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: fields are set as --config.FIELD=VALUE.")
    config_file = pathlib.Path(config_flags.get_config_filename(FLAGS["config"]))
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    if FLAGS.show_config:
        from nmfjax import configuration

        print(f"{config_file}, as this command sets it.")
        print(configuration.describe_config(FLAGS.config))
        with contextlib.suppress(UserError):  # data not at hand: the fields above are still the answer
            print(configuration.describe_data_defaults(FLAGS.config))
        return
    from nmfjax import parallel

    with cli.exit_on_errors():
        # Before JAX computes anything: the CPU's devices, then the other processes.
        distributed = FLAGS.config.distributed.enabled
        settings = parallel.distributed_settings(FLAGS.config.distributed) if distributed else {}
        parallel.use_cpu_devices_of(FLAGS.config, settings.get("num_processes", 1))
        parallel.use_compilation_cache()
        if distributed:
            parallel.start_distributed(settings)
        from nmfjax import training

        training.train_and_evaluate(
            FLAGS.config, FLAGS.workdir or f"runs/{FLAGS.config.model.architecture}", start_over=FLAGS.start_over
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags, argv=sys.argv)
