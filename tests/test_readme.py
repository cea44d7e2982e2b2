"""The README's promises: its example runs, and CI runs its test command."""

import re

import pytest

from tests.conftest import ROOT, SHARED_TFDS

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
    readme_commands = [
        line.strip() for block in _code_blocks("bash") for line in block.splitlines() if "pytest" in line
    ]
    assert ci_commands == readme_commands and len(ci_commands) == 1, (ci_commands, readme_commands)
