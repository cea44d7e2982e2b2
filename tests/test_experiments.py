"""The paper's analyses (nmfjax.experiments): their pieces, and every command on tiny trained workdirs."""

import json
import pathlib
import shutil
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cnmf_local
from nmfjax import checkpoints, configuration, data, errors, experiments, models, ops, plots, training
from nmfjax.workdirs import load_config, read_metrics
from tests.conftest import ROOT, mocked_tfds
from tests.tiny_configs import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MOCK_EXAMPLES = 20
TINY_OVERRIDES = ["num_epochs=1", "batch_size=10", "eval_batch_size=10", "model.nmf.iterations=2", "log_every_steps=1"]


def _is_png(path: pathlib.Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One tiny trained workdir per network kind, on tfds's mock data."""
    root = tmp_path_factory.mktemp("runs")
    with mocked_tfds(MOCK_EXAMPLES):
        for model in ("cnn", "cnmf_1x1"):
            training.train_and_evaluate(tiny_config(model, num_epochs=2), root / model)
    return root


# --- pieces ---


def test_noise_follows_spec_at_the_ends_and_keeps_images_normalised():
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    normalised = images / jnp.sum(images, axis=(1, 2, 3), keepdims=True)
    key = jax.random.key(1)
    np.testing.assert_allclose(experiments.add_noise(key, images, "uniform", 0.0), normalised, rtol=1e-5)
    np.testing.assert_allclose(experiments.add_noise(key, images, "holes", 0.0), normalised, rtol=1e-5)
    assert np.all(np.asarray(experiments.add_noise(key, images, "holes", 1.0)) == 0)
    pure_noise = experiments.add_noise(key, images, "uniform", 1.0)
    assert not np.allclose(pure_noise, normalised, rtol=0.1)
    for kind, eta in (("uniform", 0.3), ("holes", 0.3), ("uniform", 1.0)):
        np.testing.assert_allclose(
            jnp.sum(experiments.add_noise(key, images, kind, eta), axis=(1, 2, 3)), 1.0, rtol=1e-5
        )
    holes = np.asarray(experiments.add_noise(key, images, "holes", 0.3))
    removed = holes == 0
    assert np.all(removed.all(-1) == removed.any(-1)), "holes remove whole pixels (every channel)"
    assert abs(removed[..., 0].mean() - 0.3) < 0.02
    with pytest.raises(ValueError, match="noise kind must be one of"):
        experiments.add_noise(key, images, "salt", 0.1)


def test_hoyer_sparsity_is_zero_for_uniform_and_one_for_one_hot():
    np.testing.assert_allclose(experiments.hoyer_sparsity(jnp.full((3, 8), 0.125)), 0.0, atol=1e-6)
    np.testing.assert_allclose(experiments.hoyer_sparsity(jnp.eye(8)), 1.0, atol=1e-6)


def test_pareto_front_keeps_runs_no_smaller_run_beats():
    parameters = [10, 20, 30, 40, 50, 50]
    accuracies = [0.5, 0.4, 0.6, 0.6, 0.7, 0.65]
    assert experiments.pareto_front(parameters, accuracies) == [0, 2, 4]


def test_sweep_grid_applies_groups_where_they_divide_the_channels():
    variants = experiments.sweep_variants((32, 64, 96, 10), 3, widths=(1, 2), nmf_groups=(1, 4), mix_groups=(16,))
    assert len(variants) == 4
    assert variants["width1_nmf4_mix16"] == {"width": 1, "groups": (1, 4, 4, 1), "mix_groups": (16, 16, 16, 1)}
    assert variants["width2_nmf1_mix16"]["groups"] == (1, 1, 1, 1)
    assert len(experiments.sweep_variants((32, 64, 96, 10), 3)) == 100  # the paper's 100 variants
    for overrides in variants.values():  # every variant builds
        model_overrides = {f"model.{field}": value for field, value in overrides.items()}
        spec = configuration.network_spec(configuration.apply_overrides(tiny_config(), model_overrides))
        nnx.eval_shape(lambda spec=spec: models.Network(spec, rngs=nnx.Rngs(0)))


def test_with_nmf_options_keeps_the_weights():
    model = models.Network(
        models.NetworkSpec(features=(4, 8, 8, 10), nmf=ops.NMFOptions(iterations=3)), rngs=nnx.Rngs(0)
    )
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 3))
    same = experiments.with_nmf_options(model, gradient="unrolled")
    np.testing.assert_allclose(same.logits(images), model.logits(images), rtol=1e-5)
    longer = experiments.with_nmf_options(model, iterations=6)
    assert longer.blocks[0].module_a.options.iterations == 6 and model.blocks[0].module_a.options.iterations == 3
    assert not np.allclose(longer.logits(images), model.logits(images), rtol=1e-4)


def test_gradient_study_compares_each_nmf_layer_with_unrolled():
    model = models.Network(
        models.NetworkSpec(features=(4, 8, 8, 10), nmf=ops.NMFOptions(iterations=2)), rngs=nnx.Rngs(0)
    )
    images = jax.random.uniform(jax.random.key(0), (6, 28, 28, 3))
    labels = jnp.arange(6) % 10
    results = experiments.gradient_study(model, images, labels, values=(3,), modes=("approx", "implicit", "unrolled"))
    layers = {"block 1", "block 2", "block 3", "block 4"}
    assert {(row["mode"], row["layer"]) for row in results["rows"]} == {
        (mode, layer) for mode in ("approx", "implicit", "unrolled") for layer in layers
    }
    for row in results["rows"]:
        assert -1 <= row["cosine"] <= 1 + 1e-6 and row["norm_ratio"] > 0
        if row["mode"] == "unrolled":  # against itself: exact
            assert row["cosine"] == pytest.approx(1.0) and row["norm_ratio"] == pytest.approx(1.0)
    # The other modes really differ from unrolled autodiff.
    for mode in ("approx", "implicit"):
        assert min(row["cosine"] for row in results["rows"] if row["mode"] == mode) < 0.999


def test_local_learning_config_trains_hidden_nmf_layers_without_the_labels():
    config = configuration.apply_overrides(cnmf_local.get_config(), {"model.nmf.iterations": 3})
    images = jax.random.uniform(jax.random.key(0), (6, 28, 28, 3))
    labels = jnp.arange(6) % 10
    model = models.Network(configuration.network_spec(config), rngs=nnx.Rngs(0))
    local = [experiments.module_a_gradients(model, images, y) for y in (labels, (labels + 3) % 10)]
    backprop = experiments.with_nmf_options(model, learning="backprop")
    supervised = [experiments.module_a_gradients(backprop, images, y) for y in (labels, (labels + 3) % 10)]
    for layer in ("block 1", "block 2", "block 3"):
        # The local rule only reconstructs the input; backprop depends on the labels.
        np.testing.assert_allclose(local[0][layer], local[1][layer], rtol=1e-5)
        assert not np.allclose(supervised[0][layer], supervised[1][layer], rtol=1e-3)
    # The classifier (block 4) learns by backprop, so the labels reach it.
    assert not np.allclose(local[0]["block 4"], local[1]["block 4"], rtol=1e-3)
    np.testing.assert_allclose(local[0]["block 4"], supervised[0]["block 4"], rtol=1e-4, atol=1e-9)


# --- commands on trained workdirs ---


def test_evaluation_reproduces_the_training_runs_test_accuracy(workdirs, mock_data):
    for model in ("cnn", "cnmf_1x1"):
        run = experiments.load_trained(workdirs / model, "latest")
        split = experiments.load_test_split(run.config, None, None)
        row = read_metrics(workdirs / model)[-1]
        clean = experiments.evaluator(run.model, split, batch_size=run.config.eval_batch_size)()
        assert clean["accuracy"] == row["test_accuracy"]
        np.testing.assert_allclose(clean["loss"], row["test_loss"], rtol=1e-5)
        # eta = 0 only rescales each image, which the L1-normalised patches undo.
        evaluate = experiments.evaluator(run.model, split, batch_size=10)
        scaled = evaluate(experiments.Noise("uniform", seed=0), (np.float32(0.0),))
        assert scaled["accuracy"] == clean["accuracy"]


def test_noise_command_writes_one_curve_per_workdir(workdirs, mock_data, tmp_path):
    experiments.main(
        [
            "noise",
            str(workdirs / "cnn"),
            str(workdirs / "cnmf_1x1"),
            "--levels",
            "0",
            "0.5",
            "1",
            "--output",
            str(tmp_path),
        ]
    )
    results = json.loads((tmp_path / "noise.json").read_text())
    assert results["levels"] == [0, 0.5, 1] and results["test_images"] == MOCK_EXAMPLES
    assert sorted(run["model"] for run in results["runs"].values()) == ["cnmf_1x1", "cnn"]
    for run in results["runs"].values():
        assert len(run["uniform"]) == len(run["holes"]) == 3
        assert all(0 <= a <= 1 for a in run["uniform"] + run["holes"])
    assert _is_png(tmp_path / "noise.png")


def test_iterations_command_evaluates_every_n(workdirs, mock_data):
    experiments.main(["iterations", str(workdirs / "cnmf_1x1"), "--values", "1", "3", "5"])
    output = workdirs / "cnmf_1x1" / "experiments"
    results = json.loads((output / "iterations.json").read_text())
    assert results["iterations"] == [1, 3, 5] and results["trained_iterations"] == 3
    best_epoch_accuracy = max(row["test_accuracy"] for row in read_metrics(workdirs / "cnmf_1x1"))
    assert results["accuracy"][1] == best_epoch_accuracy  # N = 3 is how it was trained (best checkpoint)
    assert _is_png(output / "iterations.png")


def test_gradients_weights_reconstructions_and_sparsity_commands(workdirs, mock_data, tmp_path):
    workdir = str(workdirs / "cnmf_1x1")
    experiments.main(["gradients", workdir, "--values", "2", "--batch", "4", "--output", str(tmp_path)])
    experiments.main(["weights", workdir, "--output", str(tmp_path)])
    experiments.main(["reconstructions", workdir, "--count", "3", "--output", str(tmp_path)])
    experiments.main(["sparsity", workdir, "--batch", "5", "--output", str(tmp_path)])
    gradients = json.loads((tmp_path / "gradients.json").read_text())
    assert gradients["images"] == 4 and len(gradients["rows"]) == 2 * 4  # two modes x four NMF layers
    weights = json.loads((tmp_path / "weights.json").read_text())
    filters = np.array(weights["filters"])
    assert filters.shape == (32, 5, 5, 3) and filters.min() >= 0
    np.testing.assert_allclose(filters.reshape(32, -1).max(1), 1.0)
    reconstructions = json.loads((tmp_path / "reconstructions.json").read_text())
    assert len(reconstructions["relative_l1_error"]) == 3 and 0 < reconstructions["mean_relative_l1_error"] < 2
    sparsity = json.loads((tmp_path / "sparsity.json").read_text())["layers"]
    assert sparsity["block 1"]["positions"] == 5 * 24 * 24 and sum(sparsity["block 1"]["histogram"]) == 5 * 24 * 24
    assert set(sparsity) == {"block 1", "block 2", "block 3", "block 4"}
    for name in ("gradients", "weights", "reconstructions", "sparsity"):
        assert _is_png(tmp_path / f"{name}.png"), name


def _assert_user_error(capsys, expected, main, argv):
    """``main(argv)`` ends with exit status 2 and one line, ``error: ...``, containing ``expected``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after any progress bars
    assert line.startswith("error: ") and expected in line and "Traceback" not in err, err


def test_gradients_command_on_a_network_at_its_initialisation(mock_data, tmp_path, capsys):
    config = str(ROOT / "configs" / "cnmf.py")
    small = ["--config.model.features=(4, 8, 8, 10)", "--config.model.nmf.iterations=2"]
    experiments.main(
        ["gradients", "--config", config, *small, "--values", "3", "--batch", "4", "--output", str(tmp_path)]
    )
    results = json.loads((tmp_path / "gradients.json").read_text())
    assert results["epoch"] == 0 and {row["iterations"] for row in results["rows"]} == {3}
    _assert_user_error(capsys, "one WORKDIR, or --config", experiments.main, ["gradients", "--values", "3"])


def test_nmf_pictures_refuse_a_cnn_naming_the_reason(workdirs, mock_data, tmp_path, capsys):
    cnn = str(workdirs / "cnn")
    main = experiments.main
    _assert_user_error(capsys, "reconstructions need an NMF first layer", main, ["reconstructions", cnn])
    _assert_user_error(capsys, "has no NMF layer", main, ["sparsity", cnn, "--output", str(tmp_path)])
    experiments.main(["weights", str(workdirs / "cnn"), "--output", str(tmp_path)])  # CNN filters are pictures too
    assert _is_png(tmp_path / "weights.png")


# --- comparison and exported networks ---


def _copy_record(workdir: pathlib.Path, target: pathlib.Path, **config_changes) -> pathlib.Path:
    """A run's record (config.json, metrics.jsonl) elsewhere, with config fields changed."""
    target.mkdir(parents=True)
    config = json.loads((workdir / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    (target / "metrics.jsonl").write_text((workdir / "metrics.jsonl").read_text())
    return target


def test_compare_command_writes_the_table_figure5_curves_and_json(workdirs, tmp_path, capsys):
    unfinished = _copy_record(workdirs / "cnmf_1x1", tmp_path / "unfinished", num_epochs=5)
    output = tmp_path / "compare"
    experiments.main(
        ["compare", str(workdirs / "cnn"), str(workdirs / "cnmf_1x1"), str(unfinished), "--output", str(output)]
    )
    printed = capsys.readouterr().out
    comparison = json.loads((output / "compare.json").read_text())
    cnn, cnmf_1x1, partial = comparison["runs"]
    # The paper's parameter counts (SPEC), split into NMF, convolution and BatchNorm parts.
    assert (cnn["parameters"], cnn["nmf_parameters"], cnn["cnn_parameters"]) == (153_056, 0, 152_864)
    assert (cnmf_1x1["parameters"], cnmf_1x1["nmf_parameters"], cnmf_1x1["cnn_parameters"]) == (
        167_886,
        152_864,
        14_638,
    )
    assert cnmf_1x1["batch_norm_parameters"] == 384
    for run, workdir in ((cnn, workdirs / "cnn"), (cnmf_1x1, workdirs / "cnmf_1x1")):
        rows = read_metrics(workdir)
        best = max(rows, key=lambda row: row["test_accuracy"])
        assert run["epochs"] == run["num_epochs"] == 2
        assert (run["best_test_accuracy"], run["best_epoch"]) == (best["test_accuracy"], best["epoch"])
        assert run["final_test_accuracy"] == rows[-1]["test_accuracy"]
        assert run["seconds"] == pytest.approx(sum(row["epoch_seconds"] for row in rows))
        assert run["median_epoch_seconds"] == statistics.median(row["epoch_seconds"] for row in rows)
        for part in ("train", "eval"):
            key = f"{part}_images_per_second"
            assert run[key] == statistics.median(row[key] for row in rows)
    assert (cnn["paper_accuracy"], cnmf_1x1["paper_accuracy"]) == (0.81, 0.851)
    assert (partial["epochs"], partial["num_epochs"]) == (2, 5)
    table = (output / "compare.md").read_text()
    assert table == printed[printed.index("| model |") :]
    rows = table.splitlines()[2:]
    assert len(rows) == 3 and rows[0].startswith("| CNN | cnn | 153,056 | 0 | 152,864 | 192 |")
    assert "| 2 of 5 |" in rows[2] and "85.1 % (README 83.7 %)" in rows[1]
    for name in ("figure5.png", "learning_curves.png"):
        assert _is_png(output / name), name


def test_compare_shows_the_gap_to_the_paper_and_each_runs_earlier_run(workdirs, tmp_path, capsys, monkeypatch):
    earlier = _copy_record(workdirs / "cnmf_1x1", tmp_path / "earlier" / "cnmf_1x1")
    rows = read_metrics(earlier)[:1]
    (earlier / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # one epoch
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, output: drawn.append(figure) or pathlib.Path(output))
    argv = ["compare", str(workdirs / "cnn"), str(workdirs / "cnmf_1x1"), "--output", str(tmp_path / "out")]
    experiments.main([*argv, "--earlier", str(earlier)])
    cnn, cnmf_1x1 = json.loads((tmp_path / "out" / "compare.json").read_text())["runs"]
    assert cnn["earlier"] is None
    assert cnmf_1x1["earlier"]["epochs"] == 1 and cnmf_1x1["earlier"]["best_test_accuracy"] == rows[0]["test_accuracy"]
    table = (tmp_path / "out" / "compare.md").read_text().splitlines()
    assert table[0].endswith("| best against the paper | earlier run: best (epoch) of epochs |")
    gap = 100 * (0.851 - cnmf_1x1["best_test_accuracy"])
    assert table[3].endswith(f"| {gap:.1f} points short | {100 * rows[0]['test_accuracy']:.2f} % (1) of 1 |")
    assert table[2].endswith(" points short | - |")
    figure5 = drawn[0]
    crosses = [line for line in figure5.axes[0].lines if line.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_ydata()[0] == pytest.approx(100 * rows[0]["test_accuracy"])
    # Without earlier runs, neither the column nor the crosses.
    drawn.clear()
    experiments.main(argv)
    assert "earlier" not in (tmp_path / "out" / "compare.md").read_text()
    assert not [line for line in drawn[0].axes[0].lines if line.get_marker() == "x"]
    _assert_user_error(
        capsys, "both earlier cnmf_1x1 runs", experiments.main, [*argv, "--earlier", str(earlier), str(earlier)]
    )


def test_compare_names_a_workdir_without_epochs(workdirs, tmp_path, capsys):
    empty = _copy_record(workdirs / "cnn", tmp_path / "empty")
    (empty / "metrics.jsonl").write_text("")
    _assert_user_error(capsys, "metrics.jsonl holds no epochs", experiments.main, ["compare", str(empty)])
    _assert_user_error(capsys, "does not exist", experiments.main, ["compare", str(tmp_path / "nowhere")])


def test_compare_without_output_writes_beside_the_runs_never_into_the_current_directory(
    workdirs, tmp_path, monkeypatch, capsys
):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    first = _copy_record(workdirs / "cnn", runs / "cnn")
    second = _copy_record(workdirs / "cnmf_1x1", runs / "cnmf_1x1")
    apart = _copy_record(workdirs / "cnmf_1x1", elsewhere / "cnmf_1x1")
    monkeypatch.chdir(tmp_path)
    experiments.main(["compare", "runs/cnn", "runs/cnmf_1x1"])
    assert _is_png(runs / "experiments" / "figure5.png") and not (tmp_path / "experiments").exists()
    experiments.main(["compare", str(first)])
    assert (first / "experiments" / "compare.json").exists()
    experiments.main(["compare", str(second), str(apart)])  # no common folder: the first run's own
    assert (second / "experiments" / "compare.json").exists() and not (elsewhere / "experiments").exists()
    assert f"wrote {pathlib.Path('runs') / 'experiments' / 'compare.json'}" in capsys.readouterr().out


def _adam_counts(state) -> set[int]:
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    return {int(leaf) for path, leaf in paths_and_leaves if "count" in jax.tree_util.keystr(path)}


def test_an_exported_network_loads_and_evaluates_as_its_checkpoint(workdirs, mock_data, tmp_path, capsys):
    workdir, exported = tmp_path / "trained", tmp_path / "exported"
    shutil.copytree(workdirs / "cnmf_1x1", workdir)  # trained on a machine whose data were in /data/tfds
    config = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**config, "data_dir": "/data/tfds"}))
    experiments.main(["export", str(workdir), "--output", str(exported)])
    assert sorted(path.name for path in exported.iterdir()) == ["config.json", "metrics.jsonl", "weights.npz"]
    with np.load(exported / "weights.npz") as archive:
        assert int(archive["epoch"]) == 2
        assert archive["params/blocks/0/module_a/kernel"].shape == (5, 5, 3, 32)
        assert archive["batch_stats/blocks/0/norm_a/mean"].shape == (32,)
        assert sum(archive[name].size for name in archive.files if name.startswith("params/")) == 167_886
    assert (exported / "weights.npz").stat().st_size < 1_000_000
    _, original, original_state, _ = checkpoints.load_checkpoint(workdir, "latest")
    config, model, state, epoch = checkpoints.load_checkpoint(exported)
    assert epoch == 2 and config.model.architecture == "cnmf_1x1" and config.data_dir is None
    for ours, theirs in ((state.params, original_state.params), (state.batch_stats, original_state.batch_stats)):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(ours), jax.device_get(theirs))
    assert _adam_counts(state) == {0} and _adam_counts(original_state) == {4}  # no optimiser state: Adam starts afresh
    split = experiments.load_test_split(config, None, None)
    result = experiments.evaluator(model, split, batch_size=config.eval_batch_size)()
    assert result["accuracy"] == read_metrics(workdir)[-1]["test_accuracy"]
    # The analyses read it like a workdir.
    experiments.main(["sparsity", str(exported), "--step", "latest", "--batch", "3", "--output", str(tmp_path)])
    assert _is_png(tmp_path / "sparsity.png")


def test_running_statistics_classify_an_image_alone_as_in_a_batch(workdirs, mock_data):
    workdir = workdirs / "cnmf_1x1"
    config, model, _, _ = checkpoints.load_checkpoint(workdir, batch_norm_statistics="running")
    assert config.model.batch_norm_statistics == "running"
    split = experiments.load_test_split(config, None, 10)
    images = data.center_crop(split.images, 28)
    alone = jnp.concatenate([model(images[i : i + 1]) for i in range(len(images))])
    np.testing.assert_allclose(alone, model(images), atol=1e-6)
    _, authors, _, _ = checkpoints.load_checkpoint(workdir)  # batch statistics: an image alone is normalised by itself
    assert not np.allclose(authors.logits(images[:1]), authors.logits(images)[:1], atol=1e-5)
    with pytest.raises(errors.ConfigError, match="batch_norm_statistics must be one of"):
        checkpoints.load_checkpoint(workdir, batch_norm_statistics="moving")


def test_an_exported_network_refuses_another_epoch_and_damage_naming_the_file(workdirs, tmp_path, capsys):
    exported = tmp_path / "exported"
    checkpoints.export_network(workdirs / "cnn", exported, 1)
    assert checkpoints.load_checkpoint(exported, 1)[3] == 1
    _assert_user_error(
        capsys,
        "holds the exported weights of epoch 1 only",
        experiments.main,
        ["weights", str(exported), "--step", "2"],
    )
    with np.load(exported / "weights.npz") as archive:
        arrays = {name: archive[name] for name in archive.files if name != "params/blocks/0/module_a/kernel"}
    np.savez(exported / "weights.npz", **arrays)
    _assert_user_error(
        capsys,
        "missing: params/blocks/0/module_a/kernel",
        experiments.main,
        ["weights", str(exported), "--step", "latest"],
    )
    (exported / "weights.npz").write_bytes(b"PK\x03\x04 cut short")
    _assert_user_error(capsys, "weights.npz cannot be read", experiments.main, ["weights", str(exported)])


def test_analyses_take_an_exported_networks_one_epoch_by_default_and_say_which(workdirs, tmp_path, capsys):
    exported = tmp_path / "exported"
    checkpoints.export_network(workdirs / "cnn", exported, 1)
    rows = read_metrics(exported)  # the copied record: make epoch 2 the best, so that "best" is not exported
    rows[1]["test_accuracy"] = rows[0]["test_accuracy"] + 0.1
    (exported / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    experiments.main(["weights", str(exported), "--output", str(tmp_path / "out")])
    assert f"{exported}: epoch 1 (the exported network's one epoch)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "weights.json").read_text())["epoch"] == 1
    _assert_user_error(
        capsys,
        "holds the exported weights of epoch 1 only (the best test accuracy was epoch 2's), not 'best'",
        experiments.main,
        ["weights", str(exported), "--step", "best"],
    )
    best = max(read_metrics(workdirs / "cnn"), key=lambda row: row["test_accuracy"])["epoch"]
    experiments.main(["weights", str(workdirs / "cnn"), "--output", str(tmp_path / "workdir")])
    assert f"epoch {best} (the best test accuracy; --step picks another)" in capsys.readouterr().out


def test_evaluate_command_gives_the_recorded_accuracy_and_both_batchnorm_statistics(workdirs, mock_data, tmp_path):
    workdir = workdirs / "cnmf_1x1"
    experiments.main(["evaluate", str(workdir), "--step", "latest", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "evaluate.json").read_text())
    recorded = read_metrics(workdir)[-1]
    assert (result["epoch"], result["images"], result["batch_size"]) == (recorded["epoch"], MOCK_EXAMPLES, 10)
    assert result["recorded"] == {"test_loss": recorded["test_loss"], "test_accuracy": recorded["test_accuracy"]}
    by_statistics = result["batch_norm_statistics"]
    assert by_statistics["batch"]["accuracy"] == recorded["test_accuracy"]  # computed as in training
    np.testing.assert_allclose(by_statistics["batch"]["loss"], recorded["test_loss"], rtol=1e-6)
    assert by_statistics["running"]["loss"] != by_statistics["batch"]["loss"]
    experiments.main(
        ["evaluate", str(workdir), "--statistics", "running", "--batch_size", "5", "--output", str(tmp_path)]
    )
    alone = json.loads((tmp_path / "evaluate.json").read_text())["batch_norm_statistics"]
    assert list(alone) == ["running"]  # running statistics: the batch size changes round-off only
    np.testing.assert_allclose(alone["running"]["loss"], by_statistics["running"]["loss"], rtol=1e-5)


# --- short trainings ---


def _set(*assignments):
    return [f"--config.{assignment}" for assignment in assignments]


def test_training_commands_train_each_variant_once(mock_data, tmp_path, capsys):
    config = str(ROOT / "configs" / "cnmf_1x1.py")
    sweep = [
        "sweep",
        "--config",
        config,
        "--root",
        str(tmp_path / "sweep"),
        "--widths",
        "1",
        "--nmf_groups",
        "1",
        "2",
        "--mix_groups",
        "1",
    ]
    experiments.main([*sweep, *_set(*TINY_OVERRIDES)])
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    plain, grouped = summary["width1_nmf1_mix1"], summary["width1_nmf2_mix1"]
    assert plain["parameters"] == 167_886 and plain["epochs"] == 1
    assert grouped["nmf_parameters"] < plain["nmf_parameters"] and grouped["cnn_parameters"] == plain["cnn_parameters"]
    assert plain["nmf_parameters"] + plain["cnn_parameters"] + plain["batch_norm_parameters"] == plain["parameters"]
    assert _is_png(tmp_path / "sweep" / "sweep.png")
    capsys.readouterr()
    experiments.main([*sweep, *_set(*TINY_OVERRIDES)])
    assert capsys.readouterr().out.count("skipped") == 2

    experiments.main(
        [
            "train-gradients",
            "--config",
            config,
            "--root",
            str(tmp_path / "modes"),
            "--modes",
            "approx",
            "unrolled",
            *_set(*TINY_OVERRIDES),
        ]
    )
    modes = json.loads((tmp_path / "modes" / "train_gradients.json").read_text())["runs"]
    assert set(modes) == {"approx", "unrolled"}
    assert load_config(modes["unrolled"]["workdir"]).model.nmf.gradient == "unrolled"
    assert _is_png(tmp_path / "modes" / "train_gradients.png")

    experiments.main(
        [
            "train-iterations",
            "--config",
            config,
            "--root",
            str(tmp_path / "n"),
            "--values",
            "1",
            "3",
            *_set(*TINY_OVERRIDES),
        ]
    )
    runs = json.loads((tmp_path / "n" / "train_iterations.json").read_text())["runs"]
    assert [load_config(run["workdir"]).model.nmf.iterations for run in runs.values()] == [1, 3]
    assert _is_png(tmp_path / "n" / "train_iterations.png") and _is_png(tmp_path / "n" / "train_iterations_curves.png")


@pytest.mark.parametrize(
    "assignment, expected",
    [
        (
            "model.nmf.iteration=3",
            "--config.model.nmf.iteration: the config has no field 'iteration'; did you mean \"iterations\"",
        ),
        ("download=maybe", "--config.download=maybe: ('Non-boolean argument to boolean flag', 'maybe')"),
        ("num_epochs=two", "--config.num_epochs=two: invalid literal for int()"),
        ("num_epochs", "expected FIELD=VALUE (e.g. num_epochs=2), got 'num_epochs'"),
    ],
)
def test_config_overrides_are_parsed_and_checked_as_train_py_does(assignment, expected, tmp_path, capsys):
    config = str(ROOT / "configs" / "cnmf_1x1.py")
    argv = ["train-iterations", "--config", config, "--root", str(tmp_path), f"--config.{assignment}"]
    _assert_user_error(capsys, expected, experiments.main, argv)
    assert not any(tmp_path.iterdir())


def test_config_overrides_give_fields_their_types_as_train_py_does():
    from nmfjax import cli

    config = configuration.config_from_file(ROOT / "configs" / "cnmf_1x1.py")
    changed = cli.override_config(
        config,
        [
            "download=false",
            "data_dir=../shared/tfds",
            "model.groups=(1,2,2,1)",
            "model.nmf.epsilon=1e-3",
            "model.width=2",
        ],
    )
    assert changed.download is False and changed.data_dir == "../shared/tfds" and changed.model.groups == (1, 2, 2, 1)
    assert changed.model.nmf.epsilon == 1e-3 and changed.model.width == 2
    assert config.download is True and config.model.width == 1  # the original is left as it was


def _png_width(path: pathlib.Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_learning_curves_show_the_learning_rates_only_where_the_plateau_rule_lowered_them(workdirs, tmp_path):
    constant = tmp_path / "constant.png"
    plots.plot_learning_curves([workdirs / "cnn"], constant)
    lowered = _copy_record(workdirs / "cnn", tmp_path / "lowered")
    rows = read_metrics(lowered)
    rows[-1]["learning_rate_module_a"] /= 10
    (lowered / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with_rates = tmp_path / "with_rates.png"
    plots.plot_learning_curves([workdirs / "cnn", lowered], with_rates)
    assert _png_width(with_rates) > 1.3 * _png_width(constant)  # a third panel


def test_learning_curves_mark_each_rate_drop_on_the_loss_and_accuracy_panels(workdirs, tmp_path, monkeypatch):
    lowered = _copy_record(workdirs / "cnn", tmp_path / "lowered")
    rows = read_metrics(lowered)
    rows[0]["next_learning_rate_scale"] = 0.1  # the rule fired after epoch 1 ...
    rows[-1]["learning_rate_module_a"] /= 10
    rows[-1]["next_learning_rate_scale"] = 0.01  # ... and after epoch 2
    (lowered / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, output: drawn.append(figure) or pathlib.Path(output))
    plots.plot_learning_curves([workdirs / "cnn", lowered], tmp_path / "curves.png")
    (figure,) = drawn
    for axis in figure.axes[:2]:
        vertical = [line for line in axis.lines if line.get_label() == "lowered rates lowered"]
        assert sorted(line.get_xdata()[0] for line in vertical) == [1.5, 2.5]
        assert axis.get_legend_handles_labels()[1].count("lowered rates lowered") == 2
        assert [text.get_text() for text in axis.get_legend().get_texts()].count("lowered rates lowered") == 1
        assert not any("cnn rates lowered" in label for label in axis.get_legend_handles_labels()[1])


def test_runs_of_one_epoch_are_drawn_as_labelled_bars_not_as_dots(workdirs, tmp_path, monkeypatch):
    single = _copy_record(workdirs / "cnn", tmp_path / "single")
    first_row = read_metrics(single)[0]
    (single / "metrics.jsonl").write_text(json.dumps(first_row) + "\n")
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, output: drawn.append(figure) or pathlib.Path(output))
    plots.plot_learning_curves([single], tmp_path / "one.png")
    plots.plot_learning_curves([workdirs / "cnn"], tmp_path / "two.png")
    one, two = drawn
    assert "one epoch is not a curve" in one._suptitle.get_text()
    loss_axis, accuracy_axis = one.axes
    assert [bar.get_height() for bar in loss_axis.patches] == pytest.approx(
        [first_row["train_loss"], first_row["test_loss"]]
    )
    labels = [text.get_text() for text in accuracy_axis.texts]
    assert labels == [f"{100 * first_row[f'{split}_accuracy']:.3g} %" for split in ("train", "test")]
    assert not two.axes[0].patches and len(two.axes[0].lines) == 2  # two epochs: curves


# --- progress: long runs of the paper's recipe ---


def _recipe_record(target: pathlib.Path, rates: list[float], num_epochs: int = 500, next_scale=None) -> pathlib.Path:
    """A run's record whose epochs ran at module a's ``rates`` (the other groups scaled alike)."""
    config = tiny_config(num_epochs=num_epochs)
    target.mkdir(parents=True)
    (target / "config.json").write_text(config.to_json_best_effort())
    rows = []
    for epoch, rate in enumerate(rates, 1):
        scale = rate / config.learning_rates.module_a
        rows.append(
            {
                "epoch": epoch,
                "test_accuracy": 0.1 * epoch if epoch < 4 else 0.2,
                **{f"learning_rate_{group}": config.learning_rates[group] * scale for group in models.PARAMETER_GROUPS},
            }
        )
    if next_scale is not None:
        rows[-1]["next_learning_rate_scale"] = next_scale
    (target / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def test_progress_status_reads_epochs_rates_drops_and_why_a_run_ended(tmp_path):
    running = experiments.recipe.run_status(_recipe_record(tmp_path / "a", [1e-2, 1e-2, 1e-3, 1e-3, 1e-4]))
    assert (running["epochs"], running["best_epoch"], running["best_test_accuracy"]) == (5, 3, pytest.approx(0.3))
    assert running["drops"] == [2, 4] and running["rates"]["module_a"] == pytest.approx(1e-4)
    assert running["rates"]["mixing"] == pytest.approx(1e-5) and not running["ended"] and running["why"] == "running"
    # The rule's verdict on the last epoch, recorded with it: a drop after it, and the stop below 1e-9.
    stopped = experiments.recipe.run_status(_recipe_record(tmp_path / "b", [1e-8, 1e-8], next_scale=1e-8))
    assert stopped["drops"] == [2] and stopped["rates"]["module_a"] == pytest.approx(1e-10)
    assert stopped["ended"] and stopped["why"] == "every rate below 1e-09"
    done = experiments.recipe.run_status(_recipe_record(tmp_path / "c", [1e-2] * 3, num_epochs=3, next_scale=1.0))
    assert done["drops"] == [] and done["ended"] and done["why"] == "3 epochs"


def test_progress_command_publishes_the_records_a_status_table_and_a_state_to_resume_from(
    workdirs, mock_data, tmp_path, capsys
):
    output = tmp_path / "paper_recipe"
    output.mkdir()
    (output / "README.md").write_text("# Runs\n\nText kept.\n")
    run = tmp_path / "run"
    shutil.copytree(workdirs / "cnmf_1x1", run)  # 2 of 2 epochs: ended; say it runs to 4
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "num_epochs": 4}))
    for _ in range(2):  # the second time replaces what the first wrote
        experiments.main(["progress", str(run), "--output", str(output), "--keep_state"])
    out = capsys.readouterr().out
    assert "| CNMF + 1x1 | 2 of 4 |" in out and "kept the state to resume from" in out
    readme = (output / "README.md").read_text()
    assert readme.startswith("# Runs\n\nText kept.\n") and readme.count(experiments.recipe.STATUS_BEGIN) == 1
    assert "| CNMF + 1x1 | 2 of 4 |" in readme and "| running |" in readme
    published = output / "cnmf_1x1"
    assert load_config(published).data_dir is None
    assert (output / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    # A run published alone later joins the table; the one before keeps its row.
    experiments.main(["progress", str(workdirs / "cnn"), "--output", str(output)])
    rows = [line for line in (output / "README.md").read_text().splitlines() if line.startswith("| CN")]
    assert [row.split(" | ")[0] for row in rows] == ["| CNN", "| CNMF + 1x1"]
    assert "| 2 of 4 |" in rows[1] and not (output / "cnn" / "resume").exists()
    assert read_metrics(published) == read_metrics(run)
    # The kept state is a workdir: copied back, train.py's run continues from it and does not restart.
    resumed = tmp_path / "resumed"
    shutil.copytree(published / "resume", resumed)
    assert [path.name for path in (resumed / "checkpoints").iterdir()] == ["2"]
    training.train_and_evaluate(tiny_config("cnmf_1x1", num_epochs=3), resumed)
    rows = read_metrics(resumed)
    assert [row["epoch"] for row in rows] == [1, 2, 3] and rows[:2] == read_metrics(run)
    assert "next_learning_rate_scale" in rows[2]
    # Once the run has ended, its kept state goes.
    (run / "config.json").write_text(json.dumps({**config, "num_epochs": 2}))
    experiments.main(["progress", str(run), "--output", str(output), "--keep_state"])
    assert not (published / "resume").exists() and "ended: 2 epochs" in (output / "README.md").read_text()


def test_progress_names_a_run_without_epochs(tmp_path, capsys):
    empty = _recipe_record(tmp_path / "empty", [])
    _assert_user_error(
        capsys,
        "holds no finished epoch yet",
        experiments.main,
        ["progress", str(empty), "--output", str(tmp_path / "o")],
    )
