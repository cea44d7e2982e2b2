"""The README's promises: its example runs, and CI runs its test command."""

import json
import re

import pytest

from nmfjax import training
from nmfjax.workdirs import read_metrics, upgrade_config
from tests.conftest import ROOT, SHARED_TFDS, run_process, train_command
from tests.records import assert_training_matches_record

README = (ROOT / "README.md").read_text()


def _code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


PYTHON_EXAMPLES = _code_blocks("python")


def test_the_readme_has_python_examples():
    assert PYTHON_EXAMPLES, "the README has no Python example"


@pytest.mark.parametrize("block", PYTHON_EXAMPLES, ids=[f"example{i}" for i in range(len(PYTHON_EXAMPLES))])
def test_readme_python_example_runs(block, monkeypatch):
    # The examples' paths are relative to the repository root, where a user starts after cloning.
    monkeypatch.chdir(ROOT)
    if "../shared/" in block and not SHARED_TFDS.parent.is_dir():
        pytest.skip(f"the example reads ../shared beside the checkout ({SHARED_TFDS.parent}; CI has it)")
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})


def test_ci_runs_exactly_the_readme_test_command():
    ci_commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if "pytest" in line and not line.lstrip().startswith("#")
    ]
    readme_commands = {
        line.split("#")[0].strip(): line.split("#", 1)[1] if "#" in line else ""
        for block in _code_blocks("bash")
        for line in block.splitlines()
        if "pytest" in line
    }
    (ci_command,) = ci_commands
    assert "as CI runs it" in readme_commands[ci_command], readme_commands
    quick = [command for command in readme_commands if '-m "not slow"' in command]
    assert quick == [ci_command + ' -m "not slow"'], readme_commands


QUICK_START = ROOT / "docs" / "runs" / "quickstart"


@pytest.mark.slow
def test_the_quick_start_reproduces_its_recorded_run(shared_tfds, tmp_path):
    """The README's quick start command, offline on the subset as its sample output says, ends where its
    record (docs/runs/quickstart) did, to the round-off that 40 training steps amplify, and prints the
    same lines; tests/test_docs.py checks the README's sample against the record.
    """
    block = next(block for block in _code_blocks("bash") if "runs/quickstart" in block)
    command = " ".join(block.replace("\\\n", " ").split("python train.py", 1)[1].split())
    workdir = tmp_path / "quickstart"
    arguments = command.replace("runs/quickstart", str(workdir)).split()
    child = run_process(
        train_command(*arguments, f"--config.data_dir={shared_tfds}"), tmp_path / "process", timeout=600
    )
    assert child.process.returncode == 0, child.stderr[-3000:]
    (made,), (recorded,) = read_metrics(workdir), read_metrics(QUICK_START)
    assert_training_matches_record(made, recorded)
    # The record predates fields added since (model.nmf.kernel, steps_per_call): read as a rerun reads it.
    recorded_config = upgrade_config(json.loads((QUICK_START / "config.json").read_text()))
    made_config = json.loads((workdir / "config.json").read_text())
    assert {**made_config, "data_dir": None} == {**recorded_config, "data_dir": None}
    printed = child.stdout.replace(str(workdir), "runs/quickstart").replace(shared_tfds, "../shared/tfds")
    lines, recorded_lines = printed.splitlines(), (QUICK_START / "stdout.txt").read_text().splitlines()
    assert lines[0] == recorded_lines[0] and lines[0].startswith("Training cnmf_1x1 into runs/quickstart")
    assert lines[1].split(", compiled")[0] == recorded_lines[1].split(", compiled")[0]
    assert lines[2] == training.epoch_line(made, 1)
    assert lines[4:] == recorded_lines[4:]  # where the results are, and what to run next
