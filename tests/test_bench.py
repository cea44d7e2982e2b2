"""The benchmark runs end to end at a tiny size (no speed is asserted)."""

import dataclasses
import json

import jax
import pytest

from nmfjax import bench, models, ops
from tests.conftest import mocked_tfds


def test_tiny_benchmark_writes_json_and_plot(tmp_path, capsys):
    bench.main(["--tiny", "--output", str(tmp_path)])
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {row["model"] for row in results["throughput"]} == set(bench.TINY.models)
    for row in results["throughput"]:
        assert row["train_images_per_second"] > 0 and row["train_peak_memory_mb"] > 0
    assert {row["gradient"] for row in results["figure1"]} == {"autodiff", "unrolled", "approx", "implicit"}
    # CNMF+1x1 at N = 20 on one device is in the throughput table already: reused, not measured again.
    assert results["scaling"]["batch_size"] == [results["throughput"][0]]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "Figure 1" in capsys.readouterr().out


def test_loop_flops_match_a_hand_count_for_the_default_cnmf():
    spec = models.NetworkSpec(architecture="cnmf", nmf=ops.NMFOptions(iterations=20))
    layers = [(24 * 24, 75, 32), (8 * 8, 800, 64), (1, 1024, 96), (1, 96, 10)]  # positions, S, I per image
    expected = 19 * sum(p * (4 * s * i + 2 * s + 4 * i) for p, s, i in layers)
    assert bench.uncounted_loop_flops(spec, batch_size=1) == expected
    assert bench.uncounted_loop_flops(models.NetworkSpec(architecture="cnn"), batch_size=1) == 0


def test_precision_study_orders_the_precisions_and_writes_json(tmp_path, capsys):
    bench.main(["--precision", "--tiny", "--output", str(tmp_path)])
    results = json.loads((tmp_path / "precision.json").read_text())
    assert results["emulated"] and [row["precision"] for row in results["rows"]] == ["tf32", "bfloat16"]
    tf32, bfloat16 = results["rows"]
    for key in ("h", *(f"{mode}_{part}" for mode in ops.GRADIENTS for part in ("dx", "dw"))):
        assert 0 < tf32[key] < bfloat16[key] < 0.05, key
    assert "emulated" in capsys.readouterr().out


def test_gpu_suite_says_there_is_no_gpu_on_a_cpu(capsys):
    with pytest.raises(SystemExit) as raised:
        bench.main(["--gpu", "--data_dir", "somewhere"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no GPU is present: JAX sees only cpu devices") and "Traceback" not in err
    assert "pip install -e '.[cuda12]'" in err


def test_every_step_of_the_gpu_suite_runs_on_a_cpu_device(tmp_path, capsys):
    sizes = dataclasses.replace(bench.GPU_TINY, train={**bench.GPU_TINY.train, "download": True})  # mock data
    with mocked_tfds(20):
        results = bench.gpu_suite(jax.devices("cpu")[0], None, tmp_path, sizes)
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert written["op_against_cpu"] == results["op_against_cpu"] and written["train"] == results["train"]
    rows = results["op_against_cpu"]
    assert [row["precision"] for row in rows] == list(ops.PRECISIONS)
    float32 = rows[0]
    assert all(
        float32[key] == 0.0 for key in float32 if key not in ("iterations", "precision", "device")
    )  # same device
    assert all(row["h"] > 0 for row in rows[1:])
    cases = {(row["model"], row["batch_size"], row["precision"]) for row in results["throughput"]}
    assert cases == {("cnmf_1x1", 4, "float32"), ("cnmf_1x1", 4, "tf32")}
    assert all(row["train_images_per_second"] > 0 for row in results["throughput"])
    assert results["train"]["epoch"] == 1 and 0 <= results["train"]["test_accuracy"] <= 1
    assert "--config.model.nmf.iterations=2" in results["train"]["command"]
    assert "Throughput" in capsys.readouterr().out
