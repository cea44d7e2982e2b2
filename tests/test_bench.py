"""The benchmark runs end to end at a tiny size (no speed is asserted)."""

import json

from nmfjax import bench, models, ops


def test_tiny_benchmark_writes_json_and_plot(tmp_path, capsys):
    bench.main(["--tiny", "--output", str(tmp_path)])
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {row["model"] for row in results["throughput"]} == set(bench.TINY.models)
    for row in results["throughput"]:
        assert row["train_images_per_second"] > 0 and row["train_peak_memory_mb"] > 0
    assert {row["gradient"] for row in results["figure1"]} == {"autodiff", "unrolled", "approx", "implicit"}
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "Figure 1" in capsys.readouterr().out


def test_loop_flops_match_a_hand_count_for_the_default_cnmf():
    spec = models.NetworkSpec(architecture="cnmf", nmf=ops.NMFOptions(iterations=20))
    layers = [(24 * 24, 75, 32), (8 * 8, 800, 64), (1, 1024, 96), (1, 96, 10)]  # positions, S, I per image
    expected = 19 * sum(p * (4 * s * i + 2 * s + 4 * i) for p, s, i in layers)
    assert bench.uncounted_loop_flops(spec, batch_size=1) == expected
    assert bench.uncounted_loop_flops(models.NetworkSpec(architecture="cnn"), batch_size=1) == 0
