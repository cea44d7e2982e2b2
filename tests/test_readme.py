"""The README's promises: its example runs, and CI runs its test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_python_examples_run():
    blocks = _code_blocks("python")
    assert blocks, "the README has no Python example"
    for block in blocks:
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
