"""The record of the full-data trainings in docs/reproduction: the shipped networks load, evaluate to
their recorded accuracy, the comparison there is what the compare command makes of the records, and the
analyses in docs/experiments that the guide shows are of these networks.
"""

import json
import pathlib
import re

import numpy as np
import pytest

from nmfjax import checkpoints, experiments
from nmfjax.workdirs import read_metrics
from tests.conftest import ROOT, SHARED_TFDS
from tests.records import accuracy_tolerance, assert_matches_record

RECORD = ROOT / "docs" / "reproduction"
ANALYSES = ROOT / "docs" / "experiments"
# The four networks of the paper's Figure 5, trained on all of CIFAR-10.
NETWORKS = ("cnn", "cnn_1x1", "cnmf", "cnmf_1x1")
FULL_CIFAR10 = SHARED_TFDS.parent / "cifar10_full"


def _as_trained(model):
    """How an analysis names a shipped network at its last epoch: (workdir as the guide gives it, epoch)."""
    return f"docs/reproduction/{model}", len(read_metrics(RECORD / model))


def _skip_without_full_cifar10():
    if not (FULL_CIFAR10 / "cifar10").is_dir():
        pytest.skip(f"all of CIFAR-10 is not at {FULL_CIFAR10} (../shared/cifar10_full beside the checkout; CI has it)")


@pytest.mark.parametrize("model", NETWORKS)
def test_each_shipped_network_is_small_and_loads_as_trained(model):
    directory = RECORD / model
    assert (directory / checkpoints.EXPORTED_WEIGHTS).stat().st_size < 1_000_000
    config, network, _, epoch = checkpoints.load_checkpoint(directory)
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
    assert_matches_record(made, recorded)
    assert (tmp_path / "compare.md").read_text() == (RECORD / "compare.md").read_text()


def _readme_command(*arguments: str) -> list[str]:
    """The guide's ``python -m nmfjax.experiments`` command (docs/reproducing.md) that starts with
    ``arguments`` (its output directory aside), as a list of arguments; fails if it has no such command.
    """
    readme = " ".join((ROOT / "docs" / "reproducing.md").read_text().replace("\\\n", " ").split())
    prefix = "python -m nmfjax.experiments "
    start = prefix + " ".join(arguments)
    assert start in readme, f"docs/reproducing.md has no command {start!r}"
    # The command ends where its comment, its code block or the next command starts.
    command = re.split(r" # | ?```| python ", readme[readme.index(start) + len(prefix) :], maxsplit=1)[0].split()
    output = command.index("--output")
    return command[:output] + command[output + 2 :]


@pytest.mark.slow
def test_the_readmes_evaluate_command_reproduces_the_recorded_accuracies(tmp_path, monkeypatch):
    # Only the running statistics are recomputed (each pass over the 10,000 test images takes minutes
    # on 2 cores); the batch statistics' figures are the training's own, checked against its metrics below.
    _skip_without_full_cifar10()
    monkeypatch.chdir(ROOT)
    command = _readme_command("evaluate", "docs/reproduction/cnmf_1x1")
    experiments.main([*command, "--statistics", "running", "--output", str(tmp_path)])
    made = json.loads((tmp_path / "evaluate.json").read_text())
    recorded = json.loads((ANALYSES / "evaluate.json").read_text())
    ours, result = made.pop("batch_norm_statistics")["running"], recorded.pop("batch_norm_statistics")["running"]
    assert abs(ours["accuracy"] - result["accuracy"]) <= accuracy_tolerance(recorded["images"])
    assert_matches_record(ours["loss"], result["loss"], where="running")
    assert_matches_record(made, recorded)


def test_the_recorded_evaluation_with_batch_statistics_is_the_trainings_own_test_result():
    recorded = json.loads((ANALYSES / "evaluate.json").read_text())
    rows = [json.loads(line) for line in (ROOT / recorded["workdir"] / "metrics.jsonl").read_text().splitlines()]
    (row,) = [row for row in rows if row["epoch"] == recorded["epoch"]]
    batch = recorded["batch_norm_statistics"]["batch"]
    # Training summed on two CPU devices, the evaluation on one: their sums differ in round-off.
    assert abs(batch["accuracy"] - row["test_accuracy"]) <= accuracy_tolerance(recorded["images"], flips=3)
    np.testing.assert_allclose(batch["loss"], row["test_loss"], rtol=1e-4)


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
    monkeypatch.chdir(ROOT)  # the guide's commands, from the repository root
    experiments.main([*_readme_command(analysis, "docs/reproduction/cnmf_1x1"), "--output", str(tmp_path)])
    made = json.loads((tmp_path / f"{analysis}.json").read_text())
    assert_matches_record(made, json.loads((ANALYSES / f"{analysis}.json").read_text()), histograms=True)


def test_the_readmes_noise_command_reproduces_the_recorded_accuracies(tmp_path, monkeypatch):
    _skip_without_full_cifar10()
    monkeypatch.chdir(ROOT)
    recorded = json.loads((ANALYSES / "noise.json").read_text())
    command = _readme_command("noise", "docs/reproduction/cnn")
    networks = [argument for argument in command if argument.startswith("docs/reproduction/")]
    assert networks == [f"docs/reproduction/{model}" for model in NETWORKS]
    # Each test batch gets the noise of (seed, batch) alone, so one level of one network reproduces its entry.
    level = 0.5
    options = ["--kinds", "uniform", "--levels", str(level), "--output", str(tmp_path)]
    experiments.main([command[0], "docs/reproduction/cnmf", *command[1 + len(networks) :], *options])
    (made,) = json.loads((tmp_path / "noise.json").read_text())["runs"].values()
    (run,) = [run for run in recorded["runs"].values() if run["workdir"] == "docs/reproduction/cnmf"]
    recorded_level = [run["uniform"][recorded["levels"].index(level)]]
    assert_matches_record(made["uniform"], recorded_level, atol=accuracy_tolerance(recorded["test_images"]))


@pytest.mark.parametrize("document", ["README.md", "docs/reproducing.md", "docs/reproduction/README.md"])
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
