"""Ctrl-C, SIGTERM and SIGKILL during training and during a save, on real train.py processes:
the latest complete checkpoint survives, and the rerun ends with the metrics of an uninterrupted run.
"""

import json
import re
import signal
import textwrap
import time

import pytest

from tests.conftest import MOCK_DATA, ROOT, child_process, run_process, train_command

EPOCHS = 5
ARGS = [
    "--config",
    str(ROOT / "configs" / "cnn.py"),
    f"--config.num_epochs={EPOCHS}",
    "--config.batch_size=10",
    "--config.eval_batch_size=10",
    "--config.checkpoints_to_keep=2",
]
DATA = MOCK_DATA.format(examples=40)  # 4 steps per epoch
DETERMINISTIC = ("epoch", "train_loss", "train_loss_sum", "train_accuracy", "test_loss", "test_accuracy")


def signal_at_step(number: int, epoch: int, step: int) -> str:
    """A prelude that sends the process ``number`` as the call with train step ``step`` of ``epoch`` is made."""
    return f"""
        import os
        from nmfjax import trainer
        original_step_keys = trainer.Trainer.step_keys
        def step_keys(self, epoch, steps):  # the keys of the call that runs these steps
            if epoch == {epoch} and {step} in steps:
                os.kill(os.getpid(), {int(number)})
            return original_step_keys(self, epoch, steps)
        trainer.Trainer.step_keys = step_keys
    """


def signal_in_save(number: int, epoch: int) -> str:
    """A prelude that sends the process ``number`` from inside the checkpoint save of ``epoch``."""
    return f"""
        import os
        import orbax.checkpoint as ocp
        original_save = ocp.CheckpointManager.save
        def save(self, step, *args, **kwargs):
            if step == {epoch}:
                os.kill(os.getpid(), {int(number)})
            return original_save(self, step, *args, **kwargs)
        ocp.CheckpointManager.save = save
    """


def kill_before_commit(epoch: int) -> str:
    """A prelude that SIGKILLs the process after the checkpoint of ``epoch`` is written, before it is committed."""
    return f"""
        import os, signal
        from orbax.checkpoint._src.path import atomicity
        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self):
            if self.get().name.startswith("{epoch}."):
                os.kill(os.getpid(), signal.SIGKILL)
            return await original_finalize(self)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    """


def _rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{key: row[key] for key in DETERMINISTIC} for row in rows]


def _checkpoints(workdir):
    return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())


def _epochs_printed(child) -> int:
    return len(re.findall(r"^epoch +\d+/", child.stdout, flags=re.MULTILINE))


def _train(workdir, log, prelude=""):
    command = train_command(*ARGS, f"--workdir={workdir}", prelude=DATA + textwrap.dedent(prelude))
    return run_process(command, log, timeout=240)


@pytest.mark.slow
def test_signals_mid_epoch_and_mid_save_lose_no_complete_epoch(tmp_path):
    reference = _train(tmp_path / "reference", tmp_path / "log_reference")
    assert reference.process.returncode == 0, reference.stderr[-3000:]
    expected = _rows(tmp_path / "reference")
    assert [row["epoch"] for row in expected] == list(range(1, EPOCHS + 1))

    workdir = tmp_path / "interrupted"
    steps = [
        # (what, prelude, exit status, epochs whose checkpoint is complete afterwards)
        ("SIGINT mid-epoch 2", signal_at_step(signal.SIGINT, 2, 1), 130, 1),
        ("SIGTERM mid-epoch 2", signal_at_step(signal.SIGTERM, 2, 2), 143, 1),
        ("SIGINT during the save of epoch 2", signal_in_save(signal.SIGINT, 2), 130, 2),
        ("SIGTERM during the save of epoch 3", signal_in_save(signal.SIGTERM, 3), 143, 3),
    ]
    for number, (what, prelude, status, complete) in enumerate(steps):
        child = _train(workdir, tmp_path / f"log{number}", prelude)
        assert child.process.returncode == status, (what, child.stderr[-3000:])
        last = child.stderr.strip().splitlines()[-1]
        assert last.startswith("interrupted by SIG") and f"the checkpoint of epoch {complete} is complete" in last
        assert "Traceback" not in child.stderr, (what, child.stderr[-3000:])
        assert max(_checkpoints(workdir)) == complete, what
        assert _rows(workdir) == expected[:complete], what  # an interrupted epoch leaves no row

    child = _train(workdir, tmp_path / "log_final")
    assert child.process.returncode == 0, child.stderr[-3000:]
    assert "Resumed from" in child.stdout and "after epoch 3." in child.stdout
    assert _rows(workdir) == expected


@pytest.mark.slow
def test_sigkill_mid_save_and_at_random_moments_loses_no_complete_epoch(tmp_path):
    reference = _train(tmp_path / "reference", tmp_path / "log_reference")
    assert reference.process.returncode == 0, reference.stderr[-3000:]
    expected = _rows(tmp_path / "reference")

    workdir = tmp_path / "killed"
    # Killed after the checkpoint of epoch 2 is written but before it is committed: epoch 1 stays the latest.
    child = _train(workdir, tmp_path / "log_commit", kill_before_commit(2))
    assert child.process.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert _checkpoints(workdir) == [1]

    # kill -9 from outside, unplanned: mid-epoch; as an epoch's line is printed (its save may be running);
    # and a moment after the next one.
    moments = [
        lambda child: "epoch " in child.stderr,  # the progress bar
        lambda child: _epochs_printed(child) >= 1,
        lambda child: _epochs_printed(child) >= 1 and time.sleep(0.3) is None,
    ]
    for number, moment in enumerate(moments):
        with child_process(
            train_command(*ARGS, f"--workdir={workdir}", prelude=DATA), tmp_path / f"log_kill{number}"
        ) as child:
            deadline = time.monotonic() + 240
            while child.process.poll() is None and not moment(child) and time.monotonic() < deadline:
                time.sleep(0.02)
            child.kill()

    child = _train(workdir, tmp_path / "log_final")
    assert child.process.returncode == 0, child.stderr[-3000:]
    assert _rows(workdir) == expected
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # unfinished saves are cleared
