"""Shared fixtures: the suite's XLA flags, the real CIFAR-10 subset beside the checkout, and train.py subprocesses."""

import atexit
import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = ROOT.parent / "shared" / "tfds"

# One persistent XLA compilation cache per test process, inherited by the train.py processes it starts:
# the same tiny networks are compiled again and again, and loading them is faster than compiling.
# Set before jax is imported; the cache changes no result.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="nmfjax-test-xla-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)
# Every program, not only those that took a second to compile: many tests compile the same small ones.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# XLA's CPU backend without LLVM's optimisation passes and with its older fusion code generator, here
# and in the processes the tests start: the tests' tiny programs spend most of their time compiling.
# The first flag halved that; the second cut what was left to a third (the tiny benchmark's compilations:
# 49 s with the first alone, 16 s with both). The same programs and operations, run about as fast (the
# 10,000-image evaluation: 72 s with both, 78 s with the first). Benchmarks and users keep XLA's default.
# The older generator fuses a call of k train steps unlike a lone step, so the check that steps_per_call
# changes no bit runs in a process without it (tests/test_training.py).
NO_LLVM_PASSES = "--xla_backend_optimization_level=0"
OLDER_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
FAST_COMPILATION = f"{NO_LLVM_PASSES} {OLDER_FUSION_EMITTERS}"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILATION]).strip()

# Tests in this process see one CPU device, whatever ran before them: the backend starts now, so a
# command's main() run in-process (it splits the CPU into one device per core) cannot change it.
# The processes the tests start choose their own devices.
import jax  # noqa: E402

jax.devices()


@pytest.fixture
def shared_tfds() -> str:
    if not (SHARED_TFDS / "cifar10").is_dir():
        pytest.skip(f"the CIFAR-10 subset is not at {SHARED_TFDS} (../shared/tfds beside the checkout; CI has it)")
    return str(SHARED_TFDS)


def once_per_run(tmp_path_factory, name: str, compute):
    """``compute()``'s JSON result, computed once in a test run however many xdist workers ask for it: the
    first computes it under a file lock in the run's own temporary folder, the others read it there.
    A module's tests are spread over the workers, so a module-scoped fixture would run on each.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return compute()
    root = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    result = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if compute() fails
        if not result.exists():
            result.write_text(json.dumps(compute()))
    return json.loads(result.read_text())


# --- train.py and other commands as real processes ---


@contextlib.contextmanager
def mocked_tfds(num_examples: int):
    """tfds's mock data: a dataset that counts as downloaded, so the one try to reach its host before a
    download (``nmfjax.data.check_host_reachable``) is replaced as well; nothing else changes.
    """
    import tensorflow_datasets as tfds

    from nmfjax import data

    with tfds.testing.mock_data(num_examples=num_examples), mock.patch.object(data, "check_host_reachable", _reached):
        yield


def _reached(host: str) -> None:
    """Stands in for a host that answered."""


# The same in a train.py process, as Python run before the script.
MOCK_DATA = """
import tensorflow_datasets as tfds
from nmfjax import data
data.check_host_reachable = lambda host: None
MOCKED_DATA = tfds.testing.mock_data(num_examples={examples})  # referenced: the patches last while it lives
MOCKED_DATA.__enter__()
"""


def script_command(script: pathlib.Path | str, *args: str, prelude: str = "") -> list[str]:
    """A command that runs ``script`` (a path, or ``-m module``) as ``__main__`` with ``args``,
    after ``prelude``: Python that installs a test double (mock data, a local download, a signal).
    """
    if isinstance(script, str) and script.startswith("-m "):
        run = f"runpy.run_module({script[3:]!r}, run_name='__main__', alter_sys=True)"
        argv0 = script[3:]
    else:
        run = f"runpy.run_path({str(script)!r}, run_name='__main__')"
        argv0 = str(script)
    code = f"{textwrap.dedent(prelude)}\nimport runpy, sys\nsys.argv = [{argv0!r}, *sys.argv[1:]]\n{run}\n"
    return [sys.executable, "-c", code, *args]


def train_command(*args: str, prelude: str = "") -> list[str]:
    return script_command(ROOT / "train.py", *args, prelude=prelude)


class Child:
    """A process started in its own process group, its output in files under ``directory``;
    ``env`` adds to this process's environment (a value of None removes the variable).
    """

    def __init__(self, command: list[str], directory: pathlib.Path, env: dict[str, str | None] | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = directory / "stdout.txt", directory / "stderr.txt"
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={name: value for name, value in environment.items() if value is not None},
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float) -> int:
        """The exit status (negative: killed by that signal); fails the test after ``timeout`` seconds."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.process.args[:2]} ran over {timeout} s; stderr:\n{self.stderr[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the whole process group (the child and anything it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@contextlib.contextmanager
def child_process(command, directory, env=None):
    """A :class:`Child` that is always killed on the way out, whatever the test did."""
    child = Child(command, directory, env)
    try:
        yield child
    finally:
        if child.process.poll() is None:
            child.kill()


def run_process(command, directory, *, env=None, timeout=300) -> Child:
    """Runs a command to its end (bounded by ``timeout``) and returns it, finished."""
    with child_process(command, directory, env) as child:
        child.wait(timeout)
    return child


def assert_one_error_line(child: Child, expected: str) -> None:
    """A command ended as a user's mistake should: exit status 2 and, last on stderr (after any progress
    bars and warnings), one line ``error: ...`` containing ``expected``; no traceback.
    """
    err = child.stderr
    assert child.process.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and expected in line, err[-3000:]


# --- fixtures ---


@pytest.fixture
def x64():
    """float64 in JAX for the test (the references are float64)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def mock_data(request):
    """tfds's mock data (:func:`mocked_tfds`) with the test module's ``MOCK_EXAMPLES`` examples (default 20)."""
    with mocked_tfds(getattr(request.module, "MOCK_EXAMPLES", 20)):
        yield
