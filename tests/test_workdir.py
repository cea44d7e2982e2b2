"""Rerunning into a workdir: a changed config, damaged checkpoints, and the metrics that follow them."""

import json
import pathlib
import shutil
from unittest import mock

import numpy as np
import pytest

from nmfjax import checkpoints, configuration, data, errors, training, workdirs
from tests.conftest import mocked_tfds
from tests.tiny_configs import tiny_config

MOCK_EXAMPLES = 30
# What a rerun must reproduce exactly; times and images/s differ from run to run.
DETERMINISTIC = (
    "epoch",
    "train_loss",
    "train_loss_sum",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate_module_a",
    "learning_rate_mixing",
    "learning_rate_batch_norm",
)


def _config(**overrides):
    overrides = {"model.architecture": "cnn", "num_epochs": 3, **overrides}
    return tiny_config(overrides.pop("model.architecture"), **overrides)


def _deterministic(rows):
    return [{key: row[key] for key in DETERMINISTIC} for row in rows]


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """A CNN trained for 3 epochs (checkpoints 1-3), and the rows of a 4-epoch run to compare with."""
    root = tmp_path_factory.mktemp("workdirs")
    with mocked_tfds(MOCK_EXAMPLES):
        training.train_and_evaluate(_config(num_epochs=4), root / "four")
        shutil.copytree(root / "four", root / "three")
        # Epoch 4 of the copy did happen; keep epochs 1-3 as a 3-epoch run leaves them.
        shutil.rmtree(root / "three" / "checkpoints" / "4")
        rows = workdirs.read_metrics(root / "three")[:3]
        (root / "three" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "three", _deterministic(workdirs.read_metrics(root / "four"))


@pytest.fixture
def workdir(three_epochs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(three_epochs[0], copy)
    return copy


def _no_data_loading():
    """Mismatches must be found before the data is read and anything is compiled."""
    return mock.patch.object(data, "load_split", side_effect=AssertionError("the data was loaded"))


# --- a changed config ---


def test_a_changed_config_lists_each_field_and_the_remedies_before_any_work(workdir, mock_data):
    before = (workdir / "config.json").read_text()
    changed = _config(**{"model.width": 2, "model.nmf.iterations": 5, "learning_rates.mixing": 0.01})
    with _no_data_loading(), pytest.raises(errors.WorkdirError) as raised:
        training.train_and_evaluate(changed, workdir)
    message = str(raised.value)
    assert "learning_rates.mixing: 0.001 -> 0.01" in message
    assert "model.nmf.iterations: 3 -> 5" in message and "model.width: 1 -> 2" in message
    assert "--workdir" in message and "--start_over" in message and "\n" not in message
    assert (workdir / "config.json").read_text() == before  # nothing was touched
    assert len(workdirs.read_metrics(workdir)) == 3


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.architecture": "cnmf"},
        {"model.groups": (1, 2, 2, 1)},
        {"model.kernel_sizes": (3, 5, 0, 1)},
        {"model.features": (16, 64, 96, 10)},
        {"model.nmf.gradient": "implicit"},
        {"batch_size": 5},
        {"seed": 1},
        {"augment.flip": False},
        {"crop_size": 24},
    ],
)
def test_fields_that_change_the_state_or_the_recipe_are_refused(workdir, overrides):
    (name,) = overrides
    with _no_data_loading(), pytest.raises(errors.WorkdirError, match=f"{name}: "):
        training.train_and_evaluate(_config(**overrides), workdir)


def test_config_differences_ignore_exactly_the_resumable_fields():
    saved = json.loads(_config().to_json_best_effort())
    changes = {
        "num_epochs": 9,
        "min_learning_rate": 1e-3,
        "data_dir": "/data",
        "download": False,
        "log_every_steps": 5,
        "checkpoints_to_keep": 9,
        "distributed.enabled": True,
        "distributed.num_processes": 2,
        "cpu_devices": 2,
        "steps_per_call": 4,
        "model.nmf.kernel": "pallas",
        "model.nmf.unroll": True,
    }
    covered = {field for field in configuration.RESUMABLE_FIELDS for name in changes if name.startswith(field)}
    assert covered == set(configuration.RESUMABLE_FIELDS)
    assert workdirs.config_differences(saved, _config(**changes)) == []
    assert workdirs.config_differences(
        saved, _config(**{"eval_batch_size": 5, "plateau.patience": 3, "model.nmf.precision": "tf32"})
    ) == [("eval_batch_size", 10, 5), ("model.nmf.precision", "float32", "tf32"), ("plateau.patience", 10, 3)]
    del saved["model"]["readout_learning"]  # a field the saved run did not have
    assert workdirs.config_differences(saved, _config()) == [("model.readout_learning", "(absent)", None)]


def test_fields_that_may_change_on_resume_are_accepted(workdir, three_epochs, mock_data, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "tfds"
    elsewhere.mkdir(parents=True)
    resumed = _config(num_epochs=4, data_dir=str(elsewhere), log_every_steps=7, checkpoints_to_keep=1)
    with mock.patch.object(data, "load_split", wraps=data.load_split) as load_split:
        training.train_and_evaluate(resumed, workdir)
    assert load_split.call_args.kwargs["data_dir"] == str(elsewhere)  # the new value is used
    assert _deterministic(workdirs.read_metrics(workdir)) == three_epochs[1]
    assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 4  # and recorded
    assert sorted(int(step.name) for step in (workdir / "checkpoints").iterdir()) == [4]  # the latest and the best


def test_the_best_checkpoint_is_still_known_after_a_restart(workdir, mock_data):
    """The retention policy must see the test accuracy of checkpoints saved by an earlier process."""
    training.train_and_evaluate(_config(num_epochs=5, checkpoints_to_keep=1), workdir)
    accuracies = {row["epoch"]: row["test_accuracy"] for row in workdirs.read_metrics(workdir)}
    best = {epoch for epoch, accuracy in accuracies.items() if accuracy == max(accuracies.values())}
    kept = {int(step.name) for step in (workdir / "checkpoints").iterdir()}
    # The latest, and one of the best (orbax keeps the latest of equals); nothing else survives.
    assert 5 in kept and len(kept - {5}) <= 1 and kept & best and kept <= best | {5}, (kept, accuracies)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with _no_data_loading(), pytest.raises(errors.WorkdirError, match="notes.txt is a file; give a directory"):
        training.train_and_evaluate(_config(), tmp_path / "notes.txt")


def test_start_over_moves_the_previous_run_aside(workdir, mock_data):
    training.train_and_evaluate(_config(num_epochs=1, **{"model.width": 2}), workdir, start_over=True)
    (aside,) = workdir.parent.glob("run.replaced-*")
    assert (
        len(workdirs.read_metrics(aside)) == 3
        and json.loads((aside / "config.json").read_text())["model"]["width"] == 1
    )
    assert [row["epoch"] for row in workdirs.read_metrics(workdir)] == [1]
    assert json.loads((workdir / "config.json").read_text())["model"]["width"] == 2


# --- damaged checkpoints ---


def _data_file(step: pathlib.Path) -> pathlib.Path:
    return max(step.glob("default/d/*"), key=lambda path: path.stat().st_size)


def _truncate(step):
    path = _data_file(step)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


DAMAGE = {
    "truncated data file": (3, _truncate),
    "missing data file": (3, lambda step: _data_file(step).unlink()),
    "missing array metadata": (3, lambda step: (step / "default" / "_METADATA").unlink()),
    "missing commit marker": (3, lambda step: (step / "commit_success.txt").unlink()),
    "empty step directory": (4, lambda step: step.mkdir()),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    kind, workdir, three_epochs, mock_data, capfd
):
    step, damage = DAMAGE[kind]
    damage(workdir / "checkpoints" / str(step))
    training.train_and_evaluate(_config(num_epochs=4), workdir)
    out, err = capfd.readouterr()
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert f"the checkpoint of epoch {step} " in warning and "moved it to" in warning
    assert "Traceback" not in err and "Event loop is closed" not in err
    assert (workdir / checkpoints.DAMAGED_CHECKPOINTS / str(step)).is_dir()  # kept, not deleted
    assert f"Resumed from {workdir / 'checkpoints'} after epoch {step - 1}." in out
    # Epochs after the checkpoint are trained again and metrics.jsonl follows: as one uninterrupted run.
    assert _deterministic(workdirs.read_metrics(workdir)) == three_epochs[1]


def test_when_no_checkpoint_can_be_restored_the_error_names_the_directory_and_the_remedy(workdir, mock_data, capfd):
    steps = list((workdir / "checkpoints").iterdir())
    for step in steps:
        _truncate(step)
    for _ in range(2):  # the same answer when rerun after the checkpoints were moved aside
        with _no_data_loading(), pytest.raises(errors.WorkdirError) as raised:
            training.train_and_evaluate(_config(num_epochs=4), workdir)
        message = str(raised.value)
        assert str(workdir / "checkpoints") in message and "records epochs up to 3" in message, message
        assert str(workdir / checkpoints.DAMAGED_CHECKPOINTS) in message and "--start_over" in message
    assert len(workdirs.read_metrics(workdir)) == 3  # nothing was dropped
    assert capfd.readouterr().err.count("warning:") == len(steps)  # each reported once, when it was moved


def test_the_row_of_a_checkpoint_saved_just_before_a_crash_is_recovered(workdir, three_epochs, mock_data):
    """A crash between saving epoch 3 and writing its metrics row."""
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    assert training.train_and_evaluate(_config(num_epochs=3), workdir) == {}  # nothing left to train
    assert _deterministic(workdirs.read_metrics(workdir)) == three_epochs[1][:3]


def test_a_metrics_line_cut_short_is_skipped_with_a_warning(workdir, capsys):
    with open(workdir / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 4, "train_lo')
    assert [row["epoch"] for row in workdirs.read_metrics(workdir)] == [1, 2, 3]
    assert "line 4 is not valid JSON" in capsys.readouterr().err


def test_load_checkpoint_names_a_missing_epoch_and_a_damaged_one(workdir):
    with pytest.raises(errors.MissingFileError, match=r"no checkpoint of epoch 9 .* holds epochs \[2, 3\]"):
        checkpoints.load_checkpoint(workdir, 9)
    _truncate(workdir / "checkpoints" / "3")
    with pytest.raises(errors.WorkdirError, match="the checkpoint of epoch 3 .* cannot be restored"):
        checkpoints.load_checkpoint(workdir, "latest")
    *_, epoch = checkpoints.load_checkpoint(workdir, 2)
    assert epoch == 2


def test_a_config_json_from_before_the_model_section_is_converted(tmp_path):
    """Workdirs written before the model fields moved under config.model still load and resume."""
    config = _config()
    old = json.loads(config.to_json_best_effort())
    model = old.pop("model")
    old["nmf"] = {**model.pop("nmf"), "readout_learning": model.pop("readout_learning")}
    old["model"] = model.pop("architecture")
    old.update(model)  # kernel_sizes, features, ... at the top level
    del old["nmf"]["precision"]  # added in 0.3
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert workdirs.load_config(tmp_path).to_dict() == json.loads(config.to_json_best_effort())
    assert workdirs.config_differences(old, config) == []
    changed = _config(**{"model.nmf.iterations": 7})
    assert workdirs.config_differences(old, changed) == [("model.nmf.iterations", 3, 7)]
    assert workdirs.config_differences(old, _config(**{"model.nmf.precision": "tf32"})) == [
        ("model.nmf.precision", "float32", "tf32")
    ]


def _rows(scales, verdicts=None, rate=0.01):
    """Metrics rows that ran at ``rate`` times float32 ``scales``, with the rule's ``verdicts`` where given."""
    rows = [
        {"epoch": epoch, "learning_rate_module_a": rate * float(np.float32(scale))}
        for epoch, scale in enumerate(scales, 1)
    ]
    for row, verdict in zip(rows, verdicts or [], strict=False):
        if verdict is not None:
            row["next_learning_rate_scale"] = float(np.float32(verdict))
    return rows


@pytest.mark.parametrize(
    ("scales", "verdicts", "drops"),
    [
        ([1, 1, 0.1, 0.1, 0.01], None, [2, 4]),  # before 0.4: the next epoch's lower rate
        ([1, 1, 0.1], [1, 0.1, 0.01], [2, 3]),  # since 0.4: the verdict, the last epoch's included
        ([1, 0.1, 0.1], [None, None, 0.1], [1]),  # resumed across 0.4: an unchanged verdict is no drop
        ([1, 0.1, 0.01], [None, 0.01, 0.001], [1, 2, 3]),  # float32 scales of 0.1 ** k: each drop once
        ([1e-7, 1e-8], [1e-8, 1e-9], [1, 2]),  # far down, near the stop at 1e-9
        ([], None, []),
    ],
)
def test_rate_drops_are_the_epochs_after_which_the_plateau_rule_lowered_the_rates(scales, verdicts, drops):
    assert workdirs.rate_drops(_rows(scales, verdicts)) == drops
