"""The record of the full-data trainings in docs/reproduction: the shipped networks load, evaluate to
their recorded accuracy, and the comparison there is what the compare command makes of the records.
"""

import json
import pathlib

import numpy as np
import pytest

from nmfjax import data, experiments, training
from nmfjax.workdirs import read_metrics
from tests.conftest import ROOT, SHARED_TFDS

RECORD = ROOT / "docs" / "reproduction"
# The paper's Figure 5 networks whose full-data training has ended (CNMF is still training: issue 18).
NETWORKS = ("cnn", "cnn_1x1", "cnmf_1x1")
FULL_CIFAR10 = SHARED_TFDS.parent / "cifar10_full"


@pytest.mark.parametrize("model", NETWORKS)
def test_each_shipped_network_is_small_and_loads_as_trained(model):
    directory = RECORD / model
    assert (directory / training.EXPORTED_WEIGHTS).stat().st_size < 1_000_000
    config, network, _, epoch = training.load_checkpoint(directory)
    rows = read_metrics(directory)
    assert config.model.architecture == model and epoch == rows[-1]["epoch"] == len(rows)


def test_the_runs_have_the_same_epochs_and_the_paper_recipe():
    configs = {model: json.loads((RECORD / model / "config.json").read_text()) for model in NETWORKS}
    epochs = {model: len(read_metrics(RECORD / model)) for model in NETWORKS}
    assert len(set(epochs.values())) == 1 and min(epochs.values()) >= 25, epochs
    for config in configs.values():
        assert (config["seed"], config["batch_size"], config["eval_batch_size"]) == (0, 50, 50)
        assert config["learning_rates"] == {"module_a": 0.01, "mixing": 0.001, "batch_norm": 0.001}
        assert config["plateau"]["patience"] == 10 and config["num_train_examples"] is None


def test_the_record_is_what_the_compare_command_makes_of_it(tmp_path):
    experiments.main(["compare", *(str(RECORD / model) for model in NETWORKS), "--output", str(tmp_path)])
    recorded = json.loads((RECORD / "compare.json").read_text())
    made = json.loads((tmp_path / "compare.json").read_text())
    for runs in (recorded["runs"], made["runs"]):
        for run in runs:
            run["workdir"] = pathlib.Path(run["workdir"]).name
    assert made == recorded
    assert (tmp_path / "compare.md").read_text() == (RECORD / "compare.md").read_text()


@pytest.mark.slow
def test_the_shipped_cnmf_1x1_gets_its_recorded_accuracy_on_the_cifar10_test_split():
    if not (FULL_CIFAR10 / "cifar10").is_dir():
        pytest.skip(f"all of CIFAR-10 is not at {FULL_CIFAR10} (../shared/cifar10_full beside the checkout; CI has it)")
    config, network, _, epoch = training.load_checkpoint(RECORD / "cnmf_1x1")
    recorded = {row["epoch"]: row for row in read_metrics(RECORD / "cnmf_1x1")}[epoch]
    split = data.load_split("cifar10", "test", data_dir=str(FULL_CIFAR10), download=False)
    result = experiments.evaluator(network, split, batch_size=config.eval_batch_size)()
    # Batches of 50 in the split's order, as in training (batch statistics in BatchNorm); one CPU device here,
    # two in training: the sums differ in float round-off only.
    assert abs(result["accuracy"] - recorded["test_accuracy"]) <= 3 / len(split), (result, recorded)
    np.testing.assert_allclose(result["loss"], recorded["test_loss"], rtol=1e-4)
