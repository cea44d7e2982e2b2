"""The paper's analyses (arXiv 2503.20398) as commands; each writes JSON and a PNG.

On trained workdirs (written by ``train.py``)::

    python -m nmfjax.experiments noise runs/cnn runs/cnmf runs/cnmf_1x1 --output experiments/noise
    python -m nmfjax.experiments iterations runs/cnmf_1x1 --values 1 2 5 10 20 50 100
    python -m nmfjax.experiments gradients runs/cnmf_1x1 --values 5 20 50
    python -m nmfjax.experiments gradients --config configs/cnmf_1x1.py   # the network at its initialisation
    python -m nmfjax.experiments weights runs/cnmf_1x1
    python -m nmfjax.experiments reconstructions runs/cnmf_1x1
    python -m nmfjax.experiments sparsity runs/cnmf_1x1
    python -m nmfjax.experiments compare runs/cnn runs/cnn_1x1 runs/cnmf runs/cnmf_1x1 --output compare
    python -m nmfjax.experiments export runs/cnmf_1x1 --output shipped/cnmf_1x1   # weights without optimiser state

Short trainings, one workdir per variant under ``--root`` (rerunning resumes
unfinished variants and skips finished ones; ``--config.FIELD=VALUE`` changes
the config of every variant, as for ``train.py``)::

    python -m nmfjax.experiments train-iterations --config configs/cnmf_1x1.py --values 5 10 20 --root runs/iterations
    python -m nmfjax.experiments train-gradients --config configs/cnmf_1x1.py --root runs/gradients
    python -m nmfjax.experiments sweep --config configs/cnmf_1x1.py --root runs/sweep

Outputs go to ``--output`` (default: ``WORKDIR/experiments`` for one workdir,
``PARENT/experiments`` beside several in one folder, ``--root`` for trainings). Commands that read
test images take ``--data_dir`` (default: the workdir's ``config.data_dir``)
and ``--limit`` (the first test images only).

An exported network (``export``: ``config.json``, ``metrics.jsonl`` and
``weights.npz``) is read wherever a workdir is. One module per analysis
(:mod:`~nmfjax.experiments.compare`, :mod:`~nmfjax.experiments.noise`,
:mod:`~nmfjax.experiments.iterations`, :mod:`~nmfjax.experiments.gradients`,
:mod:`~nmfjax.experiments.pictures`, :mod:`~nmfjax.experiments.sweep`); each
computes and returns plain data, which :mod:`nmfjax.plots` draws.
"""

from nmfjax.experiments.cli import main
from nmfjax.experiments.common import (
    Trained,
    evaluator,
    in_evaluation_mode,
    initialised,
    load_test_split,
    load_trained,
    with_nmf_options,
)
from nmfjax.experiments.compare import (
    AUTHORS_README_ACCURACY,
    MODEL_NAMES,
    PAPER_ACCURACY,
    compare_runs,
    markdown_table,
    summarize_run,
)
from nmfjax.experiments.gradients import GRADIENT_MODES, gradient_study, module_a_gradients
from nmfjax.experiments.iterations import iterations_at_evaluation
from nmfjax.experiments.noise import NOISE_KINDS, NOISE_LEVELS, Noise, add_noise, noise_robustness
from nmfjax.experiments.pictures import (
    first_layer_filters,
    first_layer_reconstructions,
    hoyer_sparsity,
    nmf_activation_sparsity,
)
from nmfjax.experiments.sweep import (
    SWEEP_GROUPS,
    SWEEP_WIDTHS,
    pareto_front,
    sweep_variants,
)

__all__ = [
    "AUTHORS_README_ACCURACY",
    "MODEL_NAMES",
    "PAPER_ACCURACY",
    "GRADIENT_MODES",
    "NOISE_KINDS",
    "NOISE_LEVELS",
    "SWEEP_GROUPS",
    "SWEEP_WIDTHS",
    "Noise",
    "Trained",
    "add_noise",
    "compare_runs",
    "evaluator",
    "first_layer_filters",
    "first_layer_reconstructions",
    "gradient_study",
    "hoyer_sparsity",
    "in_evaluation_mode",
    "initialised",
    "iterations_at_evaluation",
    "load_test_split",
    "load_trained",
    "main",
    "markdown_table",
    "module_a_gradients",
    "nmf_activation_sparsity",
    "noise_robustness",
    "pareto_front",
    "summarize_run",
    "sweep_variants",
    "with_nmf_options",
]
