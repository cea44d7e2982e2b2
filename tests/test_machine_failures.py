"""What the machine does to a run ends in one ``error:`` line with exit status 2, and loses nothing:
a full disk, a read-only workdir, a damaged or cut-off dataset file, a dataset smaller than a batch.

The full disk and the read-only file system are small tmpfs mounts, which need root (the tests
run as root here and in CI; elsewhere they skip, saying why).
"""

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import pathlib
import shutil
import subprocess

import pytest

from nmfjax import bench, errors, experiments
from tests.conftest import MOCK_DATA, ROOT, assert_one_error_line, run_process, train_command

CONFIG = str(ROOT / "configs" / "cnmf_1x1.py")
TINY = ["--config.batch_size=10", "--config.eval_batch_size=10", "--config.model.nmf.iterations=2"]
MOCK = MOCK_DATA.format(examples=20)
DETERMINISTIC = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate_module_a")


@contextlib.contextmanager
def _tmpfs(directory: pathlib.Path, size: str, *options: str):
    """A tmpfs of ``size`` mounted at ``directory`` for the test (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def _train(workdir: pathlib.Path, logs: pathlib.Path, *args: str, prelude: str = MOCK):
    command = train_command("--config", CONFIG, f"--workdir={workdir}", *TINY, *args, prelude=prelude)
    return run_process(command, logs, timeout=300)


def _rows(workdir: pathlib.Path) -> list[tuple]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [tuple(row[key] for key in DETERMINISTIC) for row in rows]


def test_a_disk_that_fills_during_a_save_loses_nothing_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path):
    uninterrupted = _train(tmp_path / "uninterrupted", tmp_path / "logs0", "--config.num_epochs=4")
    assert uninterrupted.process.returncode == 0, uninterrupted.stderr[-3000:]
    # 3 MB: epoch 1's checkpoint (2 MB: weights and Adam's moments) fits, epoch 2's does not.
    with _tmpfs(tmp_path / "disk", "3m") as disk:
        workdir = disk / "run"
        full = _train(workdir, tmp_path / "logs1", "--config.num_epochs=4")
        assert_one_error_line(full, "saving the checkpoint of epoch 2")
        line = full.stderr.strip().splitlines()[-1]
        assert "the disk is full (it needs about 2.0 MB" in line and "it resumes after epoch 1" in line, line
        assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == ["1"]  # the partial one is gone
        assert _rows(workdir) == _rows(tmp_path / "uninterrupted")[:1]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        rerun = _train(workdir, tmp_path / "logs2", "--config.num_epochs=4")
        assert rerun.process.returncode == 0, rerun.stderr[-3000:]
        assert "Resumed from" in rerun.stdout and "after epoch 1" in rerun.stdout
        assert _rows(workdir) == _rows(tmp_path / "uninterrupted")


def test_a_read_only_workdir_is_one_line_and_the_benchmark_says_so_before_measuring(tmp_path, capsys):
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        child = _train(disk / "run", tmp_path / "logs", "--config.num_epochs=1")
        with pytest.raises(SystemExit) as raised:
            bench.main(["--tiny", "--output", str(disk / "bench")])
    assert_one_error_line(child, "the file system is read-only")
    assert "run/lock failed" in child.stderr and "--workdir" in child.stderr
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: writing ") and "read-only" in err and "Choose another --output" in err, err


@pytest.fixture
def data_copy(shared_tfds, tmp_path) -> pathlib.Path:
    """A writable copy of the CIFAR-10 subset's data directory (outside the project)."""
    copy = tmp_path / "tfds"
    shutil.copytree(shared_tfds, copy)
    for path in copy.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


def _train_file(data_dir: pathlib.Path) -> pathlib.Path:
    (path,) = data_dir.glob("cifar10/*/cifar10-train.array_record-*")
    return path


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_a_damaged_dataset_file_is_one_line_naming_it_and_how_to_prepare_it_again(data_copy, tmp_path, damage):
    train_file = _train_file(data_copy)
    if damage == "overwritten":
        with open(train_file, "r+b") as file:
            file.seek(100_000)  # inside the first 500 records
            file.write(bytes(1000))
    else:
        os.truncate(train_file, train_file.stat().st_size // 2)
    child = _train(
        tmp_path / "run",
        tmp_path / "logs",
        f"--config.data_dir={data_copy}",
        "--config.download=False",
        "--config.num_train_examples=500",
        prelude="",
    )
    assert_one_error_line(child, f"the train split of 'cifar10' is damaged: {train_file}")
    version = train_file.parent
    assert f"mv {version} {version}.damaged" in child.stderr and "--config.download=True" in child.stderr
    assert not (tmp_path / "run").exists()  # nothing of the run was written before its data were read


def test_fewer_training_examples_than_a_batch_is_one_line(tmp_path):
    child = _train(
        tmp_path / "run", tmp_path / "logs", "--config.num_train_examples=3", "--config.num_epochs=1", prelude=MOCK
    )
    assert_one_error_line(child, "config.num_train_examples=3 is smaller than config.batch_size=10")
    # The same when the dataset itself is smaller than a batch (the mock splits hold 20 images).
    small = _train(tmp_path / "run2", tmp_path / "logs2", "--config.batch_size=40", "--config.num_epochs=1")
    assert_one_error_line(small, "the train split of 'cifar10' holds 20 examples, fewer than config.batch_size=40")


def test_an_analysis_that_finds_the_disk_full_leaves_no_partial_file(tmp_path, capsys):
    workdir = tmp_path / "run"
    trained = _train(workdir, tmp_path / "logs", "--config.num_epochs=1")
    assert trained.process.returncode == 0, trained.stderr[-3000:]
    with _tmpfs(tmp_path / "disk", "40k") as disk:
        with pytest.raises(SystemExit) as raised:
            experiments.main(["compare", str(workdir), "--output", str(disk)])
        assert raised.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("error: writing ") and "the disk is full" in err
        assert "Traceback" not in err
        assert not [path.name for path in disk.iterdir() if path.name.startswith(".")]  # no half-written files


def test_after_a_reported_write_failure_asyncio_keeps_its_tasks_reports_off_the_terminal(caplog):
    """orbax's failed writes leave tasks whose "exception was never retrieved" reports come whenever they are
    garbage collected, often while the program exits after its one error line (a CI run saw them so).
    """

    def report_an_abandoned_failed_future() -> list[str]:
        caplog.clear()
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        del future
        gc.collect()
        loop.close()
        return [record.getMessage() for record in caplog.records if "never retrieved" in record.getMessage()]

    asyncio_logger = logging.getLogger("asyncio")
    for kept in [f for f in asyncio_logger.filters if getattr(f, "__module__", "") == "nmfjax.errors"]:
        asyncio_logger.removeFilter(kept)  # an earlier test in this process may have failed a write
    assert report_an_abandoned_failed_future()  # what would reach the terminal
    with pytest.raises(OSError), errors.quiet_failure():
        raise OSError(errno.ENOSPC, "No space left on device")
    assert report_an_abandoned_failed_future() == []
