"""A user's mistake ends every command with one line, ``error: ...``, and exit status 2, never a traceback."""

import json
import pathlib
import sys

import pytest

from nmfjax import bench, configuration, experiments, plots
from tests.conftest import MOCK_DATA, ROOT, assert_one_error_line, run_process, script_command, train_command

CNN = str(ROOT / "configs" / "cnn.py")


def _saved_run(workdir: pathlib.Path, epochs: int = 0, **changes) -> pathlib.Path:
    """A workdir as train.py leaves it for configs/cnn.py (config.json, metrics rows), without training."""
    config = configuration.default_config()
    config.model.architecture = "cnn"
    for name, value in changes.items():
        config.model[name] = value
    config = configuration.with_data_defaults(config)
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    rows = [{"epoch": epoch, "test_accuracy": 0.1} for epoch in range(1, epochs + 1)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return workdir


TRAIN_MISTAKES = {
    "missing config file": (["--config", "configs/nope.py"], "config file configs/nope.py does not exist"),
    # ml_collections loads the file while it parses an override: the same one line, not an OSError traceback.
    "missing config file and an override": (
        ["--config=configs/nope.py", "--config.data_dir=../shared/tfds"],
        "config file configs/nope.py does not exist",
    ),
    "groups that do not divide": (
        ["--config", CNN, "--config.model.groups=(1,3,4,1)"],
        "config.model.groups[1]=3 must divide the 32 inputs and the 64 outputs of block 2.",
    ),
    "no config": ([], "--config is required"),
    "bad value": (
        ["--config", CNN, "--config.model.nmf.iterations=0"],
        "config.model.nmf: iterations must be a positive int, got 0",
    ),
    "bad range": (["--config", CNN, "--config.augment.hue=0.9"], "config.augment.hue must be a number in [0, 0.5]"),
    "bad type": (["--config", CNN, "--config.download=maybe"], "--config.download=maybe"),
    "unknown field": (["--config", CNN, "--config.model.nmf.iteration=3"], "the config has no field 'iteration'"),
    "stray argument": (["--config", CNN, "cnn"], "unexpected arguments ['cnn']"),
}


@pytest.mark.parametrize("case", TRAIN_MISTAKES)
def test_train_py_reports_a_bad_command_line_in_one_line(case, tmp_path):
    args, expected = TRAIN_MISTAKES[case]
    child = run_process(train_command(*args, f"--workdir={tmp_path / 'run'}"), tmp_path / "process", timeout=120)
    assert_one_error_line(child, expected)
    assert not (tmp_path / "run").exists()


def test_train_py_reports_missing_data_in_one_line(tmp_path):
    args = [
        "--config",
        CNN,
        f"--workdir={tmp_path / 'run'}",
        f"--config.data_dir={tmp_path}",
        "--config.download=False",
    ]
    child = run_process(train_command(*args), tmp_path / "process", timeout=120)
    assert_one_error_line(child, f"dataset 'cifar10' (split 'train') is not prepared in {tmp_path}")


def test_train_py_reports_a_mismatched_workdir_in_one_line(tmp_path):
    workdir = _saved_run(tmp_path / "run", width=1)
    child = run_process(
        train_command("--config", CNN, f"--workdir={workdir}", "--config.model.width=2"), tmp_path / "p"
    )
    assert_one_error_line(child, f"{workdir} holds a run with another config (model.width: 1 -> 2)")


def test_train_py_reports_epochs_without_checkpoints_in_one_line(tmp_path):
    workdir = _saved_run(tmp_path / "run", epochs=3)
    command = train_command("--config", CNN, f"--workdir={workdir}", prelude=MOCK_DATA.format(examples=50))
    child = run_process(command, tmp_path / "p")  # (the data are read first: they are there)
    assert_one_error_line(child, "can be restored, but metrics.jsonl records epochs up to 3")


def test_train_py_start_over_moves_the_old_run_aside_and_trains(tmp_path):
    workdir = _saved_run(tmp_path / "run", epochs=2, width=1)
    tiny = ["--config.num_epochs=1", "--config.batch_size=10", "--config.eval_batch_size=10"]
    command = train_command(
        "--config",
        CNN,
        f"--workdir={workdir}",
        "--config.model.width=2",
        "--start_over",
        *tiny,
        prelude=MOCK_DATA.format(examples=20),
    )
    child = run_process(command, tmp_path / "p")
    assert child.process.returncode == 0, child.stderr[-3000:]
    (aside,) = tmp_path.glob("run.replaced-*")
    assert f"Moved the previous run in {workdir} to {aside}" in child.stdout
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((workdir / "config.json").read_text())["model"]["width"] == 2
    assert [json.loads(line)["epoch"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize(
    "module, args, expected",
    [
        ("nmfjax.experiments", ["noise", "{missing}"], "missing does not exist: name a workdir that train.py wrote"),
        ("nmfjax.plots", ["{missing}"], "missing does not exist: name a workdir that train.py wrote"),
        ("nmfjax.bench", ["--repeats", "0"], "argument --repeats: expected a positive int, got '0'"),
    ],
)
def test_package_commands_report_mistakes_in_one_line(module, args, expected, tmp_path):
    args = [arg.format(missing=tmp_path / "missing") for arg in args]
    child = run_process(script_command(f"-m {module}", *args), tmp_path / "process", timeout=120)
    assert_one_error_line(child, expected)


# The same commands in this process: every kind of mistake each one checks.


def _assert_user_error(capsys, main, argv, expected):
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and expected in line, err


def test_experiments_name_each_mistake(tmp_path, capsys):
    no_checkpoint = _saved_run(tmp_path / "no_checkpoint")
    cases = [
        (["noise", str(tmp_path / "missing")], "missing does not exist: name a workdir"),
        (["noise", str(tmp_path)], "config.json does not exist"),
        (["iterations", str(no_checkpoint)], "no checkpoint in"),
        (["iterations", str(no_checkpoint), "--step", "first"], 'expected "best", "latest" or an epoch'),
        (["noise", str(no_checkpoint), "--limit", "0"], "argument --limit: expected a positive int, got '0'"),
        (["noise", str(no_checkpoint), "--kinds", "snow"], "argument --kinds: invalid choice: 'snow'"),
        (["sweep", "--config", CNN, "--root", str(tmp_path / "sweep")], "use a cnmf_1x1 config, got model 'cnn'"),
        (["train-iterations", "--config", "configs/nope.py", "--root", str(tmp_path)], "config file configs/nope.py"),
        (["fly"], "argument command: invalid choice: 'fly'"),
    ]
    for argv, expected in cases:
        _assert_user_error(capsys, experiments.main, argv, expected)


def test_plots_and_bench_name_each_mistake(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _assert_user_error(capsys, plots.main, [str(tmp_path)], "holds no epochs")
    (tmp_path / "quickstart").mkdir()
    _assert_user_error(  # a typo: the directory that is there, not "no epochs"
        capsys, plots.main, [str(tmp_path / "quickstrat")], f"does not exist (did you mean {tmp_path / 'quickstart'}?)"
    )
    _assert_user_error(capsys, plots.main, [], "the following arguments are required: workdirs")
    _assert_user_error(capsys, bench.main, ["--output", str(tmp_path / "file")], "is a file; give a folder")
    _assert_user_error(capsys, bench.main, ["--repeats", "-3"], "expected a positive int")


def test_an_unexpected_failure_keeps_its_traceback(tmp_path):
    """Only a user's mistake is shortened: a bug must stay debuggable."""
    prelude = """
        from nmfjax import training
        def broken(*args, **kwargs):
            raise RuntimeError("a bug")
        training.train_and_evaluate = broken
    """
    child = run_process(train_command("--config", CNN, f"--workdir={tmp_path}", prelude=prelude), tmp_path / "p")
    assert (
        child.process.returncode not in (0, 2) and "Traceback" in child.stderr and "RuntimeError: a bug" in child.stderr
    )
    assert sys.executable  # the child ran with this interpreter


def test_offline_train_py_stops_in_one_line_and_creates_nothing(tmp_path):
    """A misspelled data directory, then a download with no network: each one line, within the bound of the
    process (tfds's own retries took minutes), and neither data directory nor workdir appears.
    """
    (tmp_path / "tfds").mkdir()
    workdir = tmp_path / "run"
    misspelled = tmp_path / "tfdss"
    child = run_process(
        train_command("--config", CNN, f"--workdir={workdir}", f"--config.data_dir={misspelled}"), tmp_path / "p1"
    )
    assert_one_error_line(child, f"config.data_dir={misspelled} does not exist (did you mean {tmp_path / 'tfds'}?)")
    offline = """
        import socket
        def create_connection(*args, **kwargs):
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        socket.create_connection = create_connection
    """
    command = train_command("--config", CNN, f"--workdir={workdir}", f"--config.data_dir={tmp_path / 'tfds'}")
    child = run_process(script_command(ROOT / "train.py", *command[3:], prelude=offline), tmp_path / "p2")
    assert_one_error_line(child, "no network (ConnectionError: cannot reach www.cs.toronto.edu")
    assert "Retrying" not in child.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p1", "p2", "tfds"]
    assert list((tmp_path / "tfds").iterdir()) == []


def test_show_config_lists_every_field_with_its_value_and_meaning(tmp_path):
    child = run_process(
        train_command("--config", CNN, "--config.model.nmf.iterations=7", "--show_config"), tmp_path / "p", timeout=120
    )
    assert child.process.returncode == 0, child.stderr[-3000:]
    lines = child.stdout.splitlines()
    assert lines[0] == f"{CNN}, as this command sets it." and "--config.FIELD=VALUE" in lines[1]
    fields = [line.split("=")[0].strip() for line in lines[2:-1] if " = " in line]
    assert lines[-1].startswith("For cifar10 (32x32x3 images, 10 classes): model.features = (32, 64, 96, 10),")
    expected = configuration.default_config()
    leaves = []

    def walk(section, prefix=""):
        for key in section.keys():
            if hasattr(section[key], "keys"):
                walk(section[key], f"{prefix}{key}.")
            else:
                leaves.append(key)

    walk(expected)
    assert sorted(fields) == sorted(leaves)
    assert "    iterations = 7" in child.stdout and "  architecture = 'cnn'" in child.stdout
    assert all(len(line.split("  ", 1)[-1].strip()) > 5 for line in lines[2:-1])  # each with its meaning
    assert "--show_config" in run_process(train_command("--help"), tmp_path / "help", timeout=120).stdout
