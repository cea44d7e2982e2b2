"""The guide's promises (README.md, its pages under docs/, CONTRIBUTING.md): every Python example runs,
every command line is one that parses, and CI runs the test command they give.
"""

import json
import pathlib
import re
import shlex

import jax.numpy as jnp
import pytest
from flax import nnx

from nmfjax import checkpoints, cli, configuration, kernels, training
from nmfjax.experiments import cli as experiments_cli
from nmfjax.workdirs import read_metrics, upgrade_config
from tests.conftest import ROOT, SHARED_TFDS, run_process, train_command
from tests.records import assert_training_matches_record

README = (ROOT / "README.md").read_text()
# The pages a user reads; the tutorial's code cells run when the guide is built (sphinx-build, in .ci/run).
GUIDE = [
    "README.md",
    "CONTRIBUTING.md",
    *sorted(path.relative_to(ROOT).as_posix() for path in ROOT.glob("docs/**/*.md")),
]


def _code_blocks(language, pages=("README.md",)):
    pattern = re.compile(rf"```{language}\n(.*?)```", re.DOTALL)
    return [block for page in pages for block in pattern.findall((ROOT / page).read_text())]


# A value of each shell loop's variable in the guide's commands (for model in ...; for seed in ...).
LOOP_VALUES = {"model": "cnmf_1x1", "seed": "1", "precision": "bfloat16"}


def _command_lines(page: str) -> list[str]:
    """The guide's shell commands of ``page``, one per line: continuations joined, comments and
    pipes cut, environment assignments dropped, a loop's variable as one of its values.
    """
    commands = []
    for block in _code_blocks("bash", [page]):
        for line in block.replace("\\\n", " ").splitlines():
            for variable, value in LOOP_VALUES.items():
                line = line.replace(f"${{{variable}}}", value).replace(f"${variable}", value)
            line = re.split(r" # |^#| \| ", line)[0].strip()
            line = re.sub(r"^(\w+=\S+ )+", "", line)  # VARIABLE=value before a command
            if line:
                commands.append(line)
    return commands


def _python_commands(program: str) -> list[tuple[str, list[str]]]:
    """``(page, arguments)`` of every command of the guide that runs ``program``."""
    name = program.split()
    found = []
    for page in GUIDE:
        for line in _command_lines(page):
            words = shlex.split(line)
            found += [(page, words[i + len(name) :]) for i in range(len(words)) if words[i : i + len(name)] == name]
    return found


TRAIN_COMMANDS = _python_commands("python train.py")
EXPERIMENT_COMMANDS = _python_commands("python -m nmfjax.experiments")


def _config_files(arguments: list[str]) -> list[str]:
    given = [arguments[i + 1] for i, argument in enumerate(arguments[:-1]) if argument == "--config"]
    return given + [argument.split("=", 1)[1] for argument in arguments if argument.startswith("--config=")]


def _overrides(arguments: list[str]) -> list[str]:
    return [argument.removeprefix("--config.") for argument in arguments if argument.startswith("--config.")]


def test_every_train_py_command_of_the_guide_names_a_config_and_fields_that_exist():
    assert len(TRAIN_COMMANDS) > 20
    for page, arguments in TRAIN_COMMANDS:
        (config_file,) = _config_files(arguments)
        assert (ROOT / config_file).is_file(), (page, arguments)
        flags = {arg.split("=")[0] for arg in arguments if arg.startswith("--") and not arg.startswith("--config")}
        assert flags <= {"--workdir", "--show_config", "--start_over"}, (page, arguments)
        try:  # as train.py types them: an unknown field or a value of the wrong type ends the command
            cli.override_config(configuration.config_from_file(ROOT / config_file), _overrides(arguments))
        except SystemExit:
            pytest.fail(f"{page}: python train.py {' '.join(arguments)} has a field or value train.py refuses")


def test_every_experiments_command_of_the_guide_parses():
    assert len(EXPERIMENT_COMMANDS) > 10
    parser = experiments_cli.build_parser()
    for page, arguments in EXPERIMENT_COMMANDS:
        given = [argument for argument in arguments if not argument.startswith("--config.")]
        try:
            args = parser.parse_args(given)
        except SystemExit:
            pytest.fail(f"{page}: python -m nmfjax.experiments {' '.join(arguments)} does not parse")
        if _overrides(arguments):
            assert args.accepts_overrides and args.config, (page, arguments)
            cli.override_config(configuration.config_from_file(ROOT / args.config), _overrides(arguments))


PYTHON_EXAMPLES = [(page, index, block) for page in GUIDE for index, block in enumerate(_code_blocks("python", [page]))]


def test_the_guide_has_python_examples_and_the_readme_one():
    assert _code_blocks("python"), "the README has no Python example"
    assert {page for page, _, _ in PYTHON_EXAMPLES} >= {"README.md", "docs/layers.md", "docs/reproducing.md"}


@pytest.mark.parametrize(
    ("page", "index", "block"), PYTHON_EXAMPLES, ids=[f"{page}-{index}" for page, index, _ in PYTHON_EXAMPLES]
)
def test_the_guides_python_examples_run(page, index, block, monkeypatch):
    # The examples' paths are relative to the repository root, where a user starts after cloning.
    monkeypatch.chdir(ROOT)
    if "../shared/" in block and not SHARED_TFDS.parent.is_dir():
        pytest.skip(f"the example reads ../shared beside the checkout ({SHARED_TFDS.parent}; CI has it)")
    exec(compile(block, f"{page} example {index}", "exec"), {"__name__": "guide_example"})


def test_ci_runs_exactly_the_guides_test_command():
    ci_commands = [
        line.split("||")[0].strip()  # (.ci/run keeps the status, waits for the guide's build, then exits with it)
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if "pytest" in line and not line.lstrip().startswith("#")
    ]
    (ci_command,) = ci_commands
    commands = [
        (line.split("#")[0].strip(), line.split("#", 1)[1] if "#" in line else "")
        for block in _code_blocks("bash", GUIDE)
        for line in block.splitlines()
        if "pytest" in line
    ]
    as_ci = {command for command, comment in commands if "as CI runs it" in comment}
    quick = {command for command, _ in commands if '-m "not slow"' in command}
    assert as_ci == {ci_command}, commands
    assert quick == {ci_command + ' -m "not slow"'}, commands
    assert all(ci_command in (ROOT / page).read_text() for page in ("README.md", "docs/getting_started.md"))


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
    # The first line, but for what runs the NMF iterations here: the record's C++ kernel where "auto"
    # takes it (a processor with AVX-512, as the record's), else XLA's loop, saying why.
    clause = re.compile(r"; NMF iterations [^)]*")
    assert clause.sub("", lines[0]) == clause.sub("", recorded_lines[0])
    assert lines[0].startswith("Training cnmf_1x1 into runs/quickstart")
    kernel_here = kernels.cpu_kernel_applies("float32", jnp.float32, "native")
    assert ("; NMF iterations in the fused C++ kernel" in lines[0]) == kernel_here
    assert lines[1].split(", compiled")[0] == recorded_lines[1].split(", compiled")[0]
    assert lines[2] == training.epoch_line(made, 1)
    assert lines[4:] == recorded_lines[4:]  # where the results are, and what to run next
    # It learnt (chance is 10 %), and its best epoch loads as a network.
    assert made["test_accuracy"] > 0.25, made
    config_back, model, _, epoch = checkpoints.load_checkpoint(workdir, "best")
    assert epoch == 1 and config_back.model.architecture == "cnmf_1x1" and isinstance(model, nnx.Module)


# --- the front page and the guide's shape ---


def test_the_readme_is_a_front_page_whose_links_lead_into_the_guide():
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the guide (docs/) takes the rest"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert {"docs/getting_started.md", "docs/tutorial.md", "docs/training.md", "docs/scaling.md"} <= set(local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"the README links to files that do not exist: {missing}"
    index = (ROOT / "docs" / "index.md").read_text()
    pages = {page for block in re.findall(r"```\{toctree\}\n(.*?)```", index, re.DOTALL) for page in block.split()}
    for link in local:
        if link.startswith("docs/") and link.endswith(".md") and link.count("/") == 1 and link != "docs/index.md":
            assert pathlib.PurePosixPath(link).stem in pages, f"{link} is not in docs/index.md's table of contents"


def test_the_tutorial_notebook_is_paired_with_its_markdown():
    jupytext = pytest.importorskip("jupytext", reason="the docs extra (pip install -e '.[docs]') brings jupytext")
    source, paired = jupytext.read(ROOT / "docs" / "tutorial.md"), jupytext.read(ROOT / "docs" / "tutorial.ipynb")
    assert [(cell.cell_type, cell.source) for cell in paired.cells] == [
        (cell.cell_type, cell.source) for cell in source.cells
    ], "docs/tutorial.ipynb differs from docs/tutorial.md: run jupytext --sync docs/tutorial.md"
    assert "ipynb,md:myst" in source.metadata["jupytext"]["formats"]
    outputs = [cell.get("outputs") for cell in paired.cells if cell.cell_type == "code"]
    assert not any(outputs), "commit docs/tutorial.ipynb without outputs"


def test_the_tutorial_says_so_and_runs_to_its_end_where_the_subset_is_missing(tmp_path, monkeypatch):
    """The docs build executes the tutorial with the subset beside the checkout (CI has it); a user
    without it gets a line that says so, and no cell fails.
    """
    jupytext = pytest.importorskip("jupytext", reason="the docs extra (pip install -e '.[docs]') brings jupytext")
    nbclient = pytest.importorskip("nbclient", reason="the docs extra brings nbclient (myst-nb's executor)")
    monkeypatch.delenv("NMFJAX_TUTORIAL_DATA", raising=False)
    where = tmp_path / "a" / "b"  # no ../shared/tfds nor ../../shared/tfds from here
    where.mkdir(parents=True)
    notebook = jupytext.read(ROOT / "docs" / "tutorial.md")
    nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(where)}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "The CIFAR-10 subset is not here" in printed and "the training cells below are skipped" in printed
    assert "test accuracy after" not in printed
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output["output_type"] == "error"]
