"""Several train.py processes: a two-process run on localhost equals the one-process run over two CPU
devices (and resumes after both are killed), and one run per workdir.
"""

import json
import os
import signal
import socket
import textwrap
import time

import pytest

from nmfjax import configuration, parallel, workdirs
from nmfjax.errors import ConfigError, WorkdirError
from tests.conftest import FAST_COMPILATION, MOCK_DATA, ROOT, child_process, once_per_run, run_process, train_command

ARGS = [
    "--config",
    str(ROOT / "configs" / "cnmf_1x1.py"),
    "--config.num_epochs=3",
    "--config.batch_size=10",
    "--config.eval_batch_size=10",
    "--config.model.nmf.iterations=3",
]
DATA = MOCK_DATA.format(examples=40)  # 4 steps per epoch
DETERMINISTIC = ("epoch", "train_loss", "train_loss_sum", "train_accuracy", "test_loss", "test_accuracy")
TIMEOUT = 300
# The test's own environment must not decide the device count or the processes (XLA's flags: only the
# suite's fast compilation).
CLEAN_ENV = {
    "XLA_FLAGS": FAST_COMPILATION,
    "JAX_NUM_CPU_DEVICES": None,
    **dict.fromkeys(parallel.DISTRIBUTED_VARIABLES.values()),
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rows(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{key: json.loads(line)[key] for key in DETERMINISTIC} for line in lines]


def _kill_at_step(epoch: int, step: int) -> str:
    """A prelude that SIGKILLs the process before it dispatches the call with train step ``step`` of ``epoch``,
    each checkpoint complete before training goes on (so the rerun's starting point is known).
    """
    return f"""
        import os, signal
        import orbax.checkpoint as ocp
        from nmfjax import trainer
        original_save = ocp.CheckpointManager.save
        def save(self, *args, **kwargs):
            saved = original_save(self, *args, **kwargs)
            self.wait_until_finished()
            return saved
        ocp.CheckpointManager.save = save
        original_step_keys = trainer.Trainer.step_keys
        def step_keys(self, epoch, steps):  # the keys of the call that runs these steps
            if epoch == {epoch} and {step} in steps:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_step_keys(self, epoch, steps)
        trainer.Trainer.step_keys = step_keys
    """


def _run_two_processes(tmp_path, name, workdir, *, use_variables=False, prelude=""):
    """The guide's "Several hosts" (docs/scaling.md): the same command in two processes, process 0 at a
    free localhost port, given as config fields or (``use_variables``) as JAX_* variables; returns their exit statuses.
    """
    address = f"127.0.0.1:{_free_port()}"
    commands = []
    for process_id in range(2):
        args = [*ARGS, f"--workdir={workdir}", "--config.distributed.enabled=True", "--config.cpu_devices=1"]
        env = dict(CLEAN_ENV)
        settings = {"coordinator_address": address, "num_processes": 2, "process_id": process_id}
        for field, value in settings.items():
            if use_variables:
                env[parallel.DISTRIBUTED_VARIABLES[field]] = str(value)
            else:
                args.append(f"--config.distributed.{field}={value}")
        commands.append((train_command(*args, prelude=DATA + textwrap.dedent(prelude)), env))
    with (
        child_process(commands[0][0], tmp_path / f"{name}-0", commands[0][1]) as first,
        child_process(commands[1][0], tmp_path / f"{name}-1", commands[1][1]) as second,
    ):
        statuses = [first.wait(TIMEOUT), second.wait(TIMEOUT)]
    return statuses, first, second


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: one process over two CPU devices (its metrics rows)."""

    def train():
        workdir = tmp_path_factory.mktemp("one-process") / "run"
        child = run_process(
            train_command(*ARGS, f"--workdir={workdir}", "--config.cpu_devices=2", prelude=DATA),
            workdir.parent / "process",
            env=CLEAN_ENV,
            timeout=TIMEOUT,
        )
        assert child.process.returncode == 0, child.stderr[-3000:]
        assert "2 device(s), " in child.stdout
        return _rows(workdir)

    return once_per_run(tmp_path_factory, "one-process-run", train)


@pytest.mark.slow
def test_two_processes_equal_one_process_over_two_devices(tmp_path, one_process_run):
    workdir = tmp_path / "run"
    statuses, first, second = _run_two_processes(tmp_path, "run", workdir)
    assert statuses == [0, 0], first.stderr[-3000:] + second.stderr[-3000:]
    assert "2 device(s) in 2 processes" in first.stdout
    assert "epoch" not in second.stdout  # process 0 reports and writes
    assert _rows(workdir) == one_process_run
    assert not (workdir / workdirs.LOCK).exists()


@pytest.mark.slow
def test_both_processes_killed_mid_run_resume_to_the_same_metrics(tmp_path, one_process_run):
    workdir = tmp_path / "run"
    statuses, _, _ = _run_two_processes(tmp_path, "killed", workdir, prelude=_kill_at_step(epoch=2, step=1))
    assert statuses == [-signal.SIGKILL, -signal.SIGKILL]
    assert _rows(workdir) == one_process_run[:1]
    assert json.loads((workdir / workdirs.LOCK).read_text())["pid"]  # left behind by the killed process 0
    # The rerun gives the run's processes as JAX_* variables instead of config fields.
    statuses, first, second = _run_two_processes(tmp_path, "resumed", workdir, use_variables=True)
    assert statuses == [0, 0], first.stderr[-3000:] + second.stderr[-3000:]
    assert "Resumed from" in first.stdout and "after epoch 1." in first.stdout and "Taking over" in first.stdout
    assert _rows(workdir) == one_process_run


def test_a_second_run_on_a_busy_workdir_stops_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    slow = ["--config.num_epochs=50", "--config.checkpoints_to_keep=1"]
    command = train_command(*ARGS, *slow, f"--workdir={workdir}", prelude=DATA)
    with child_process(command, tmp_path / "first", env=CLEAN_ENV) as first:
        lock = workdir / workdirs.LOCK
        for _ in range(TIMEOUT * 10):
            metrics = workdir / "metrics.jsonl"
            if (metrics.exists() and metrics.read_text()) or first.process.poll() is not None:
                break
            time.sleep(0.1)
        assert first.process.poll() is None, first.stderr[-3000:]
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.process.pid
        # The same command again, with the JAX variables of a cluster set but no distributed start.
        env = {**CLEAN_ENV, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
        second = run_process(command, tmp_path / "second", env=env, timeout=TIMEOUT)
        assert second.process.returncode == 2
        (message,) = second.stderr.strip().splitlines()
        assert message.startswith(f"error: {workdir} is in use by another run (pid {first.process.pid} on ")
        first.kill()
    rows = _rows(workdir)
    rerun = run_process(
        train_command(*ARGS, f"--workdir={workdir}", f"--config.num_epochs={rows[-1]['epoch'] + 1}", prelude=DATA),
        tmp_path / "rerun",
        env=CLEAN_ENV,
        timeout=TIMEOUT,
    )
    assert rerun.process.returncode == 0, rerun.stderr[-3000:]
    assert f"Taking over {lock} from a run that ended without releasing it (pid {first.process.pid}" in rerun.stdout
    assert not lock.exists()


# --- the lock and the settings, in this process ---


def test_the_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with workdirs.locked(tmp_path):
        holder = json.loads((tmp_path / workdirs.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(WorkdirError, match=f"in use by another run \\(pid {os.getpid()} on "):
            with workdirs.locked(tmp_path):
                pass
    assert not (tmp_path / workdirs.LOCK).exists()
    with workdirs.locked(tmp_path):
        pass


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / workdirs.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(WorkdirError, match="another host \\(pid 1 on elsewhere, started then\\).*delete"):
        with workdirs.locked(tmp_path):
            pass


def test_start_over_keeps_the_lock(tmp_path, capsys):
    workdir = tmp_path / "run"
    with workdirs.locked(workdir):
        (workdir / "metrics.jsonl").write_text("{}\n")
        workdirs.start_over(workdir)
        assert sorted(path.name for path in workdir.iterdir()) == [workdirs.LOCK]
    (aside,) = tmp_path.glob("run.replaced-*")
    assert sorted(path.name for path in aside.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize(
    "fields, environ, expected",
    [
        ({}, {}, {}),
        (
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
            {"JAX_PROCESS_ID": "0"},  # a field wins over its variable
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
        ),
        (
            {"process_id": 1},
            {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "2"},
            {"coordinator_address": "host:99", "num_processes": 2, "process_id": 1},
        ),
    ],
)
def test_distributed_settings_from_fields_and_variables(fields, environ, expected):
    distributed = configuration.default_config().distributed
    distributed.update(fields)
    assert parallel.distributed_settings(distributed, environ) == expected


@pytest.mark.parametrize(
    "fields, environ, match",
    [
        ({"num_processes": 2}, {}, "config.distributed.num_processes=2 is set, but config.distributed.coordinator_"),
        ({}, {"JAX_PROCESS_ID": "x"}, "JAX_PROCESS_ID='x' must be an int"),
        ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, {}, "must be HOST:PORT"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id=2 must be an int from 0"),
        ({"coordinator_address": "h:1", "process_id": 0}, {"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0 must be a"),
    ],
)
def test_missing_or_inconsistent_settings_name_the_field(fields, environ, match):
    distributed = configuration.default_config().distributed
    distributed.update(fields)
    with pytest.raises(ConfigError, match=match):
        parallel.distributed_settings(distributed, environ)


def test_enabled_without_any_setting_or_cluster_is_one_line_naming_the_fields(tmp_path):
    child = run_process(
        train_command(*ARGS, f"--workdir={tmp_path / 'run'}", "--config.distributed.enabled=True", prelude=DATA),
        tmp_path / "process",
        env=CLEAN_ENV,
        timeout=TIMEOUT,
    )
    assert child.process.returncode == 2
    (message,) = child.stderr.strip().splitlines()
    assert message.startswith("error: config.distributed.enabled=True, but the run's processes are unknown")
    assert "config.distributed.coordinator_address (or JAX_COORDINATOR_ADDRESS)" in message
