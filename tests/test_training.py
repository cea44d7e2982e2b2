"""The training recipe: loss, optimiser groups, plateau rule, end-to-end runs, resume, data parallelism."""

import functools
import json
import pathlib
import re
import shutil
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from flax import nnx

from nmfjax import (
    checkpoints,
    configuration,
    cpu_kernel,
    errors,
    evaluation,
    models,
    ops,
    parallel,
    plots,
    training,
    workdirs,
)
from nmfjax import trainer as trainer_module
from tests.conftest import MOCK_DATA, NO_LLVM_PASSES, mocked_tfds, run_process
from tests.tiny_configs import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_each_parameter_group_moves_by_its_own_learning_rate():
    config = tiny_config("cnmf_1x1")
    trainer = trainer_module.Trainer(config, configuration.validate_config(config), parallel.data_mesh())
    state = trainer.initial_state
    params = jax.device_get(state.params)
    grads = jax.tree.map(jnp.ones_like, state.params)  # Adam's first step is then exactly -lr
    updates, _ = trainer.tx.update(grads, state.opt_state, state.params)
    steps = {}
    is_variable = lambda value: isinstance(value, nnx.Variable)  # noqa: E731
    for parameter, update in zip(
        jax.tree.leaves(state.params, is_leaf=is_variable), jax.tree.leaves(updates, is_leaf=is_variable), strict=True
    ):
        steps.setdefault(models.parameter_group(parameter), set()).add(round(float(-np.mean(update[...])), 5))
    assert steps == {"module_a": {0.01}, "mixing": {0.001}, "batch_norm": {0.001}}
    assert jax.tree.structure(params) == jax.tree.structure(updates)


def test_plateau_rule_reduces_after_more_than_patience_bad_epochs():
    config = tiny_config()
    plateau = trainer_module.make_plateau(config)
    plateau_state = plateau.init(jnp.zeros(()))
    scales = []
    for _ in range(1 + 11 + 11):  # one improvement, then a loss that never improves
        _, plateau_state = plateau.update(updates=(), state=plateau_state, value=jnp.float32(1.0))
        scales.append(float(plateau_state.scale))
    # As torch.optim.lr_scheduler.ReduceLROnPlateau(patience=10): reduce on the 11th bad epoch.
    assert scales[:11] == [1.0] * 11
    np.testing.assert_allclose(scales[11:22], 0.1, rtol=1e-6)
    np.testing.assert_allclose(scales[22], 0.01, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model.architecture": "resnet"}, "config.model.architecture must be one of"),
        ({"model.pooling": (True, True, False)}, "config.model.pooling has 3 entries but config.model.features has 4"),
        ({"model.pooling": (1, 1, 0, 0)}, r"config.model.pooling must be a tuple of True/False, got \(1, 1, 0, 0\)"),
        ({"learning_rates.mixing": 0.0}, "config.learning_rates.mixing must be a positive number, got 0.0"),
        ({"learning_rates.module_a": -0.1}, "config.learning_rates.module_a must be a positive number"),
        ({"batch_size": 0}, "config.batch_size must be a positive int, got 0"),
        ({"eval_batch_size": -5}, "config.eval_batch_size must be a positive int"),
        ({"num_epochs": 2.5}, "config.num_epochs must be a positive int, got 2.5"),
        ({"seed": "0"}, "config.seed must be an int, got '0'"),
        ({"download": "false"}, "config.download must be True or False, got 'false'"),
        ({"distributed.enabled": 1}, "config.distributed.enabled must be True or False, got 1"),
        ({"data_dir": 3}, "config.data_dir must be a path or None"),
        ({"augment.flip": "yes"}, r"config.augment.flip must be True, False or None \(the data's default\), got 'yes'"),
        ({"augment.brightness": -0.5}, r"config.augment.brightness must be a number >= 0, got -0.5"),
        ({"augment.hue": 0.9}, r"config.augment.hue must be a number in \[0, 0.5\], got 0.9"),
        ({"dataset": "imagenet"}, r"config.dataset='imagenet' is not a TFDS dataset \(did you mean imagenet"),
        ({"dataset": "squad"}, "config.dataset='squad' is not an image classification dataset"),
        ({"dataset": "oxford_flowers102"}, "the images of oxford_flowers102 differ in size: set --config.image_size=N"),
        ({"image_size": 0}, "config.image_size must be a positive int or None"),
        ({"image_size": 24, "crop_size": 28}, r"config.crop_size=28 exceeds the 24x24px images of cifar10"),
        ({"model.features": (32, 64, 96, 12)}, "config.model.features ends in 12, but cifar10 has 10 classes"),
        ({"plateau.metric": "accuracy"}, "config.plateau.metric must be one of"),
        ({"plateau.factor": 1.5}, r"config.plateau.factor must be a number in \(0, 1\)"),
        ({"model.nmf.iterations": 0}, "config.model.nmf: iterations must be a positive int, got 0"),
        (
            {"model.readout_learning": "hebbian"},
            "config.model.readout_learning: learning must be one of .* got 'hebbian'",
        ),
        ({"crop_size": 40}, "config.crop_size=40 exceeds"),
        ({"model.kernel_sizes": (5, 13, 0, 1)}, r"config.model.kernel_sizes\[1\]=13 is larger than the 12x12 map"),
        ({"model.mix_groups": (1, 5, 1, 1)}, r"config.model.mix_groups\[1\]=5 must divide the 64 outputs"),
    ],
)
def test_bad_configs_fail_at_start_up_naming_the_field(overrides, match, tmp_path):
    # As a config file may write them: plain values, whatever the default's type (ConfigDict checks overrides only).
    values = tiny_config().to_dict()
    for name, value in overrides.items():
        *parents, leaf = name.split(".")
        functools.reduce(dict.__getitem__, parents, values)[leaf] = value
    no_data = mock.patch.object(training.data, "load_split", side_effect=AssertionError("the data was loaded"))
    with no_data, pytest.raises(errors.ConfigError, match=match):
        training.train_and_evaluate(ml_collections.ConfigDict(values), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def _run_train_py(config_file, workdir, *overrides):
    argv = ["train.py", f"--config={ROOT / config_file}", f"--workdir={workdir}", *overrides]
    # array_record defines absl flags when first imported; flagsaver would delete them on exit.
    import array_record.python.array_record_data_source  # noqa: F401

    import train  # the top-level script

    # config_flags reads the --config.* overrides from sys.argv.
    with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
        flags.FLAGS(argv)
        train.main(argv[:1])


@pytest.mark.parametrize("model", ["cnn", "cnmf", "cnn_1x1", "cnmf_1x1"])
def test_every_config_trains_one_tiny_epoch_end_to_end(model, tmp_path):
    with mocked_tfds(20):
        _run_train_py(
            f"configs/{model}.py",
            tmp_path,
            "--config.num_epochs=1",
            "--config.batch_size=10",
            "--config.eval_batch_size=10",
            "--config.model.nmf.iterations=3",
        )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["architecture"] == model
    (row,) = workdirs.read_metrics(tmp_path)
    assert row["epoch"] == 1
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "compile_seconds", "epoch_seconds"):
        assert np.isfinite(row[key]), key
    assert 0 <= row["test_accuracy"] <= 1
    assert (tmp_path / "checkpoints" / "1").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    plots.main([str(tmp_path)])
    png = tmp_path / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _final_state(workdir):
    *_, state, epoch = checkpoints.load_checkpoint(workdir)
    return jax.device_get(state), epoch


def test_resuming_and_any_steps_per_call_give_the_same_parameters_and_metrics_as_one_run(tmp_path):
    # 3 steps per epoch: one step per call straight through; resumed, 2 per call (a call of 2 and one
    # of 1) for epoch 1, then 3 for epoch 2. In a process with XLA's own fusion code generator, as users
    # run it: the suite's older one (conftest's OLDER_FUSION_EMITTERS) fuses a call of k steps unlike a
    # lone step, and their parameters then differ in round-off.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script = MOCK_DATA.format(examples=30) + textwrap.dedent("""
        import pathlib, sys
        from nmfjax import training, workdirs
        from tests.tiny_configs import tiny_config
        straight, resumed = map(pathlib.Path, sys.argv[1:])
        training.train_and_evaluate(tiny_config(num_epochs=2, steps_per_call=1), straight)
        training.train_and_evaluate(tiny_config(num_epochs=1, steps_per_call=2), resumed)
        assert [row["epoch"] for row in workdirs.read_metrics(resumed)] == [1]
        training.train_and_evaluate(tiny_config(num_epochs=2, steps_per_call=3), resumed)
    """)
    command = [sys.executable, "-c", script, str(straight), str(resumed)]
    child = run_process(command, tmp_path / "process", env={"XLA_FLAGS": NO_LLVM_PASSES})
    assert child.process.returncode == 0, child.stderr[-3000:]
    assert [row["epoch"] for row in workdirs.read_metrics(resumed)] == [1, 2]
    measured = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
    rows = [[{key: row[key] for key in measured} for row in workdirs.read_metrics(run)] for run in (straight, resumed)]
    assert rows[0] == rows[1]
    (state_a, epoch_a), (state_b, epoch_b) = _final_state(straight), _final_state(resumed)
    assert epoch_a == epoch_b == 2
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(a, b)
    # The run really trained: parameters moved away from the initialisation.
    config = tiny_config()
    initial = trainer_module.Trainer(config, configuration.validate_config(config), parallel.data_mesh()).initial_state
    assert not np.allclose(jax.tree.leaves(initial.params)[0], jax.tree.leaves(state_a.params)[0])


@pytest.mark.parametrize(("steps_per_call", "calls"), [(1, 7), (3, 3), (7, 1), (50, 1)])
def test_an_epoch_runs_its_steps_in_calls_of_steps_per_call_and_checks_for_a_stop_after_each(steps_per_call, calls):
    config = tiny_config("cnn", steps_per_call=steps_per_call)
    trainer = trainer_module.Trainer(config, configuration.validate_config(config), parallel.data_mesh())
    images = trainer.put_replicated(np.zeros((70, 32, 32, 3), np.uint8))
    labels = trainer.put_replicated(np.zeros((70,), np.int32))
    stops = []
    _, metrics = trainer.train_epoch(trainer.initial_state, 1, images, labels, False, lambda: stops.append(1))
    assert len(stops) == calls
    assert metrics["train_images_per_second"] * metrics["train_seconds"] == pytest.approx(70)  # all 7 batches


def test_a_calls_keys_are_the_keys_of_its_steps():
    config = tiny_config("cnn")
    trainer = trainer_module.Trainer(config, configuration.validate_config(config), parallel.data_mesh())
    keys = jax.random.key_data(trainer.step_keys(2, range(3, 6)))
    expected = [jax.random.key_data(trainer.step_key(2, step)) for step in range(3, 6)]
    np.testing.assert_array_equal(keys, np.stack(expected))


def test_steps_per_call_defaults_to_one_on_a_cpu_and_ten_on_an_accelerator():
    config = tiny_config()
    assert config.steps_per_call is None and trainer_module.steps_per_call(config) == 1
    with mock.patch.object(jax, "default_backend", return_value="gpu"):
        assert trainer_module.steps_per_call(config) == 10
    assert trainer_module.steps_per_call(tiny_config(steps_per_call=4)) == 4


def test_a_finished_run_is_not_trained_again(tmp_path):
    with mocked_tfds(20):
        training.train_and_evaluate(tiny_config(num_epochs=1), tmp_path)
        assert training.train_and_evaluate(tiny_config(num_epochs=1), tmp_path) == {}
    assert len(workdirs.read_metrics(tmp_path)) == 1


def test_a_run_that_cannot_read_its_data_writes_nothing_and_leaves_the_workdir_reusable(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(errors.DatasetUnavailableError, match="does not exist"):
        training.train_and_evaluate(tiny_config(data_dir=str(tmp_path / "missing")), workdir)
    assert not workdir.exists()  # not even the directory
    workdir.mkdir()
    with pytest.raises(errors.DatasetUnavailableError, match="is not prepared"):
        training.train_and_evaluate(tiny_config(data_dir=str(tmp_path), download=False), workdir)
    assert list(workdir.iterdir()) == []  # no config.json, metrics.jsonl or checkpoints/
    with mocked_tfds(20):
        training.train_and_evaluate(tiny_config("cnn"), workdir)  # another model: nothing holds the workdir
    assert json.loads((workdir / "config.json").read_text())["model"]["architecture"] == "cnn"


@pytest.mark.parametrize(
    ("path", "products"),
    [
        ("native", "bfloat16 on the CPU's bf16 units, float32 sums"),
        ("emulated", "bfloat16, emulated: operands rounded, float32 products"),
    ],
)
def test_the_first_line_says_how_the_bfloat16_products_run(tmp_path, capsys, path, products):
    # On the bf16 units "auto" takes the C++ kernel where it runs them there too; the emulation, XLA's loop.
    config = tiny_config()
    config.model.nmf.precision = "bfloat16"
    with mocked_tfds(20), ops.forcing_cpu_bfloat16(path):
        training.train_and_evaluate(config, tmp_path)
    first = capsys.readouterr().out.splitlines()[0]
    source = "cifar10 from tfds's default data directory"
    iterations = "; NMF iterations in the fused C++ kernel" if path == "native" and cpu_kernel.bfloat16_units() else ""
    assert first == f"Training cnmf_1x1 into {tmp_path} ({source}; NMF products in {products}{iterations})."


@pytest.mark.parametrize(
    ("kernel", "unavailable", "vector_bits", "says"),
    [
        ("auto", None, 512, "; NMF iterations in the fused C++ kernel"),
        (
            "auto",
            None,
            256,
            "; NMF iterations in XLA's loop, faster than the C++ kernel on a processor without AVX-512",
        ),
        ("cpu", None, 256, "; NMF iterations in the fused C++ kernel"),
        (
            "auto",
            "no C++ compiler ('c++')",
            None,
            "; NMF iterations in XLA's loop: the C++ kernel is unavailable (no C++",
        ),
        ("xla", None, 512, ""),
    ],
)
def test_the_first_line_says_whether_the_cpu_kernel_runs(
    tmp_path, capsys, monkeypatch, kernel, unavailable, vector_bits, says
):
    if unavailable is None and not cpu_kernel.available():
        pytest.skip(f"the CPU kernel cannot be built here: {cpu_kernel.unavailable_reason()}")
    # (the processor's vector width as the build reports it: each choice of "auto" on any machine)
    monkeypatch.setattr(cpu_kernel, "vector_bits", lambda: vector_bits)
    if unavailable is not None:
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
        monkeypatch.setattr(cpu_kernel, "unavailable_reason", lambda: unavailable + "\nthe compiler's other lines")
    config = tiny_config(**{"model.nmf.kernel": kernel})
    with mocked_tfds(20):
        training.train_and_evaluate(config, tmp_path)
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith(f"Training cnmf_1x1 into {tmp_path} (cifar10 from tfds's default data directory{says}")
    assert first.endswith(").") and second.startswith("cnmf_1x1: ")  # one line, whatever the reason


def test_a_bad_bfloat16_path_in_the_environment_is_a_config_error(tmp_path, monkeypatch):
    config = tiny_config()
    config.model.nmf.precision = "bfloat16"
    monkeypatch.setenv(ops.CPU_BFLOAT16_ENV, "amx")
    ops._cpu_bfloat16_default.cache_clear()
    try:
        with pytest.raises(errors.ConfigError, match="NMFJAX_CPU_BFLOAT16 must be one of .* got 'amx'. Unset it"):
            training.train_and_evaluate(config, tmp_path / "run")
    finally:
        monkeypatch.delenv(ops.CPU_BFLOAT16_ENV)
        ops._cpu_bfloat16_default.cache_clear()
    assert not (tmp_path / "run").exists()


def test_a_run_names_its_workdir_first_and_sums_itself_up_last(tmp_path, capsys):
    with mocked_tfds(20):
        training.train_and_evaluate(tiny_config(num_epochs=2), tmp_path)
    lines = capsys.readouterr().out.splitlines()
    # (then the NMF iterations' path: the next test)
    assert lines[0].startswith(f"Training cnmf_1x1 into {tmp_path} (cifar10 from tfds's default data directory")
    assert lines[0].endswith(").")
    rows = workdirs.read_metrics(tmp_path)
    best = max(rows, key=lambda row: row["test_accuracy"])
    summary = lines[lines.index(next(line for line in lines if line.startswith("Best test accuracy"))) :]
    assert summary[0] == (
        f"Best test accuracy {100 * best['test_accuracy']:.2f}% (epoch {best['epoch']}), "
        f"last {100 * rows[-1]['test_accuracy']:.2f}% (epoch 2)."
    )
    assert summary == training.run_summary(tmp_path).splitlines()
    for name in ("config.json", "metrics.jsonl", "checkpoints/", "tensorboard/"):
        assert name in summary[1] and (tmp_path / name.rstrip("/")).exists()
    # The summary's first command works as printed.
    plots_command = next(line for line in summary if "nmfjax.plots" in line).split("#")[0].split()
    assert plots_command[:3] == ["python", "-m", "nmfjax.plots"]
    plots.main(plots_command[3:])
    assert (tmp_path / "learning_curves.png").exists()


@pytest.mark.parametrize("installed", [True, False])
def test_the_tensorboard_hint_says_how_to_install_it_where_its_command_is_missing(installed, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": 0.5}) + "\n")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if installed else None)
    (line,) = [line for line in training.run_summary(tmp_path).splitlines() if "tensorboard --logdir" in line]
    command, _, comment = line.partition("#")
    assert command.split() == ["tensorboard", "--logdir", str(tmp_path)]
    assert comment.strip() == ("" if installed else "after pip install 'nmfjax[tensorboard]'")
    # ... and that extra installs it.
    assert re.search(r'^tensorboard = \["tensorboard>=', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_of_that_epoch(tmp_path):
    nan_loss = mock.patch.object(evaluation, "composite_loss", lambda logits, labels: logits[:, 0] * jnp.nan)
    with mocked_tfds(20), nan_loss:
        with pytest.raises(errors.TrainingDiverged, match="epoch 1: the training loss is nan"):
            training.train_and_evaluate(tiny_config(num_epochs=2), tmp_path)
    assert workdirs.read_metrics(tmp_path) == []
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


_DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"  # after the suite's flags
    import jax, numpy as np
    from nmfjax import configuration, evaluation, parallel, trainer as trainers
    from tests.tiny_configs import tiny_config

    assert jax.device_count() == 8
    config = tiny_config("cnmf_1x1", batch_size=16, eval_batch_size=16)
    spec = configuration.validate_config(config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    batch = rng.permutation(40)[:16].astype(np.int32)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        trainer = trainers.Trainer(config, spec, parallel.data_mesh(devices))
        args = (trainer.put_replicated(images), trainer.put_replicated(labels), batch, trainer.step_key(1, 0))
        args = (*args, evaluation.no_metrics(trainer.mesh))
        hlo = trainer.train_step.lower(trainer.initial_state, *args).compile().as_text()
        state, metrics = trainer.train_step(trainer.initial_state, *args)
        results.append((jax.device_get(state), jax.device_get(metrics), "all-reduce" in hlo))
    (single, single_metrics, single_reduces), (sharded, sharded_metrics, sharded_reduces) = results
    assert not single_reduces and sharded_reduces, "the 8-device step must all-reduce across the batch"
    np.testing.assert_allclose(single_metrics["loss"], sharded_metrics["loss"], rtol=1e-5)
    # Equal up to the order of float reductions: 2e-5 is under 2 % of the smallest Adam step (1e-3).
    # The mixing biases of blocks with BatchNorm after them have a zero gradient up to round-off, which
    # Adam's first step rescales to any size up to the learning rate: for them, only that bound holds.
    for tree in ("params", "batch_stats"):
        pairs = zip(jax.tree.leaves_with_path(getattr(single, tree)), jax.tree.leaves(getattr(sharded, tree)))
        for (path, a), b in pairs:
            name = jax.tree_util.keystr(path)
            block = int(name.split("'blocks'][")[1].split("]")[0]) if "'blocks'][" in name else None
            round_off = "'mixing'" in name and "'bias'" in name and config.model.batch_norm[block]
            tolerance = config.learning_rates.mixing if round_off else 2e-5
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=tolerance, err_msg=name)
    print("DATA PARALLEL OK")
    """
)


def test_sharded_step_on_eight_devices_equals_the_single_device_step(tmp_path):
    child = run_process([sys.executable, "-c", _DATA_PARALLEL_SCRIPT], tmp_path, timeout=600)
    assert child.process.returncode == 0 and "DATA PARALLEL OK" in child.stdout, child.stderr[-3000:]


def test_the_epochs_run_the_programs_compiled_ahead_of_time():
    # The persistent compilation cache does not keep a program with the CPU kernel's call: were the
    # epochs to call the jitted steps, each would compile again, inside the first epoch's timing.
    from nmfjax.bench import throughput

    trainer, _, (state, images, labels, *_) = throughput.synthetic_train_step("cnmf_1x1", 4, 2, 1)
    trainer.compile(state, images, labels, images, labels)
    state, _ = trainer.train_epoch(state, 1, images, labels, progress=False)
    trainer.evaluate(state, images, labels)
    assert trainer.train_steps._cache_size() == 0
    assert trainer.evaluator.step._cache_size() == 0
    # Other shapes still go through jit: 6 images are a whole batch of 4 and a last one of 2.
    trainer.evaluate(state, images[:6], labels[:6])
    assert trainer.evaluator.step._cache_size() == 2
