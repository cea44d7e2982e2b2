"""The record of the full-data trainings in docs/reproduction: the shipped networks load, evaluate to
their recorded accuracy, the comparison there is what the compare command makes of the records, and the
analyses in docs/experiments that the README shows are of these networks.
"""

import json
import pathlib

import numpy as np
import pytest

from nmfjax import data, experiments, training
from nmfjax.workdirs import read_metrics
from tests.conftest import ROOT, SHARED_TFDS

RECORD = ROOT / "docs" / "reproduction"
ANALYSES = ROOT / "docs" / "experiments"
# The four networks of the paper's Figure 5, trained on all of CIFAR-10.
NETWORKS = ("cnn", "cnn_1x1", "cnmf", "cnmf_1x1")
FULL_CIFAR10 = SHARED_TFDS.parent / "cifar10_full"


def _as_trained(model):
    """How an analysis names a shipped network at its last epoch: (workdir as the README gives it, epoch)."""
    return f"docs/reproduction/{model}", len(read_metrics(RECORD / model))


def _skip_without_full_cifar10():
    if not (FULL_CIFAR10 / "cifar10").is_dir():
        pytest.skip(f"all of CIFAR-10 is not at {FULL_CIFAR10} (../shared/cifar10_full beside the checkout; CI has it)")


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
    _skip_without_full_cifar10()
    config, network, _, epoch = training.load_checkpoint(RECORD / "cnmf_1x1")
    recorded = {row["epoch"]: row for row in read_metrics(RECORD / "cnmf_1x1")}[epoch]
    split = data.load_split("cifar10", "test", data_dir=str(FULL_CIFAR10), download=False)
    result = experiments.evaluator(network, split, batch_size=config.eval_batch_size)()
    # Batches of 50 in the split's order, as in training (batch statistics in BatchNorm); one CPU device here,
    # two in training: the sums differ in float round-off only.
    assert abs(result["accuracy"] - recorded["test_accuracy"]) <= 3 / len(split), (result, recorded)
    np.testing.assert_allclose(result["loss"], recorded["test_loss"], rtol=1e-4)


@pytest.mark.parametrize(
    ("analysis", "model"),
    [("weights", "cnmf_1x1"), ("weights_cnn", "cnn"), ("reconstructions", "cnmf_1x1"), ("sparsity", "cnmf_1x1")],
)
def test_the_readme_pictures_are_of_the_shipped_networks_as_trained(analysis, model):
    analysed = json.loads((ANALYSES / f"{analysis}.json").read_text())
    assert (analysed["workdir"], analysed["epoch"]) == _as_trained(model)


def test_the_noise_robustness_is_of_the_four_shipped_networks_as_trained():
    runs = json.loads((ANALYSES / "noise.json").read_text())["runs"].values()
    assert {(run["workdir"], run["epoch"]) for run in runs} == {_as_trained(model) for model in NETWORKS}


@pytest.mark.parametrize(
    ("analysis", "test_images"), [("weights", False), ("reconstructions", True), ("sparsity", True)]
)
def test_the_readmes_picture_commands_reproduce_the_recorded_analyses(analysis, test_images, tmp_path, monkeypatch):
    if test_images:
        _skip_without_full_cifar10()
    monkeypatch.chdir(ROOT)  # the README's commands, from the repository root
    data_dir = ["--data_dir", "../shared/cifar10_full"] if test_images else []
    arguments = [analysis, "docs/reproduction/cnmf_1x1", "--step", "latest", *data_dir, "--output", str(tmp_path)]
    experiments.main(arguments)
    made = json.loads((tmp_path / f"{analysis}.json").read_text())
    assert made == json.loads((ANALYSES / f"{analysis}.json").read_text())


def test_the_readmes_noise_command_reproduces_the_recorded_accuracies(tmp_path, monkeypatch):
    _skip_without_full_cifar10()
    monkeypatch.chdir(ROOT)
    recorded = json.loads((ANALYSES / "noise.json").read_text())
    # Each test batch gets the noise of (seed, batch) alone, so one level of one network reproduces its entry.
    level = 0.5
    arguments = ["noise", "docs/reproduction/cnmf", "--step", "latest", "--data_dir", "../shared/cifar10_full"]
    options = ["--limit", "1000", "--kinds", "uniform", "--levels", str(level), "--output", str(tmp_path)]
    experiments.main([*arguments, *options])
    (made,) = json.loads((tmp_path / "noise.json").read_text())["runs"].values()
    (run,) = [run for run in recorded["runs"].values() if run["workdir"] == "docs/reproduction/cnmf"]
    assert made["uniform"] == [run["uniform"][recorded["levels"].index(level)]]


@pytest.mark.parametrize("document", ["README.md", "docs/reproduction/README.md"])
def test_the_full_data_tables_give_the_recorded_numbers(document):
    text = (ROOT / document).read_text()
    for run in json.loads((RECORD / "compare.json").read_text())["runs"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {run['name']} | "))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2:7] == [
            f"{100 * run['best_test_accuracy']:.2f} % ({run['best_epoch']})",
            f"{100 * run['final_test_accuracy']:.2f} %",
            str(run["epochs"]),
            f"{run['parameters']:,}",
            f"{run['median_epoch_seconds']:.0f} s",
        ], document
