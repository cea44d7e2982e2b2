"""The benchmark runs end to end at a tiny size (no speed is asserted)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from nmfjax import bench, cpu_kernel, kernels, models, ops
from nmfjax.bench import bfloat16 as bench_bfloat16
from tests.conftest import mocked_tfds


def test_tiny_benchmark_writes_json_and_plot(tmp_path, capsys):
    bench.main(["--tiny", "--output", str(tmp_path)])
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {row["model"] for row in results["throughput"]} == set(bench.TINY.models)
    # The peak is measured in the run, for one device and for all of them, and is each row's yardstick.
    peaks = results["peak_gflops"]
    assert set(peaks) == {"1", str(jax.device_count())} and all(peak > 0 for peak in peaks.values())
    for row in results["throughput"]:
        assert row["train_images_per_second"] > 0 and row["train_peak_memory_mb"] > 0
        peak = peaks[str(row["devices"])]
        assert row["train_fraction_of_peak"] == pytest.approx(row["train_gflop_per_second"] / peak)
        assert row["eval_fraction_of_peak"] == pytest.approx(row["eval_gflop_per_second"] / peak)
    # train.py's epoch path next to the bare step, on the same trainer.
    (loop,) = results["loop"]
    assert loop["model"] == "cnmf_1x1" and loop["steps_per_call"] == 1
    for part in ("train", "eval"):
        assert loop[f"loop_{part}_ratio"] == pytest.approx(
            loop[f"loop_{part}_images_per_second"] / loop[f"bare_{part}_images_per_second"]
        )
    assert not hasattr(bench, "DEFAULT_PEAK_GFLOPS")
    assert {row["gradient"] for row in results["figure1"]} == {"autodiff", "unrolled", "approx", "implicit"}
    # CNMF+1x1 at N = 20 on one device is in the throughput table already: reused, not measured again.
    assert results["scaling"]["batch_size"] == [results["throughput"][0]]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "Figure 1" in out and "float32 peak" in out and "train.py's epoch against the bare step" in out


def test_loop_flops_match_a_hand_count_for_the_default_cnmf():
    spec = models.NetworkSpec(architecture="cnmf", nmf=ops.NMFOptions(iterations=20))
    layers = [(24 * 24, 75, 32), (8 * 8, 800, 64), (1, 1024, 96), (1, 96, 10)]  # positions, S, I per image
    expected = 19 * sum(p * (4 * s * i + 2 * s + 4 * i) for p, s, i in layers)
    assert bench.uncounted_loop_flops(spec, batch_size=1) == expected
    assert bench.uncounted_loop_flops(models.NetworkSpec(architecture="cnn"), batch_size=1) == 0


def test_precision_study_orders_the_precisions_and_writes_json(tmp_path, capsys):
    bench.main(["--precision", "--tiny", "--output", str(tmp_path)])
    results = json.loads((tmp_path / "precision.json").read_text())
    assert results["bfloat16_path"] == ops.cpu_bfloat16_path()
    assert [row["precision"] for row in results["rows"]] == ["tf32", "bfloat16"]
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


KERNELS = ("xla", "xla_unrolled", "pallas")  # what --gpu compares: XLA's loop, unrolled, and the fused kernel


def test_every_step_of_the_gpu_suite_runs_on_a_cpu_device(tmp_path, capsys):
    sizes = dataclasses.replace(bench.GPU_TINY, train={**bench.GPU_TINY.train, "download": True})  # mock data
    with mocked_tfds(20):
        results = bench.gpu_suite(jax.devices("cpu")[0], None, tmp_path, sizes)
    written = json.loads((tmp_path / "gpu.json").read_text())
    assert written["op_against_cpu"] == results["op_against_cpu"] and written["train"] == results["train"]
    assert written["peak_gflops"]["1"] > 0  # the device's own float32 peak, measured in the run
    rows = results["op_against_cpu"]
    assert [row["precision"] for row in rows] == list(ops.PRECISIONS)
    float32 = rows[0]
    assert all(
        float32[key] == 0.0 for key in float32 if key not in ("iterations", "precision", "device")
    )  # same device
    assert all(row["h"] > 0 for row in rows[1:])
    cases = {(row["model"], row["batch_size"], row["precision"], row["kernel"]) for row in results["throughput"]}
    assert cases == {("cnmf_1x1", 4, "float32", kernel) for kernel in KERNELS}
    assert all(row["train_images_per_second"] > 0 for row in results["throughput"])
    # The profile of one step with each kernel: the fused kernel's program has no loop of N updates.
    assert [row["kernel"] for row in results["profile"]] == list(KERNELS)
    assert all(row["fusions"] > 0 and row["wall_ms_per_step"] > 0 for row in results["profile"])
    assert [row["kernel"] for row in results["train"]] == list(KERNELS)
    for row in results["train"]:
        assert row["epoch"] == 1 and 0 <= row["test_accuracy"] <= 1
        options = bench.nmf_variant(row["kernel"])
        assert f"--config.model.nmf.kernel={options['kernel']}" in row["command"]
        assert ("--config.model.nmf.unroll=True" in row["command"]) == options.get("unroll", False)
        assert "--config.model.nmf.iterations=2" in row["command"]
        assert row["paper_recipe_minutes"] == pytest.approx(bench.paper_recipe_minutes(row))
    out = capsys.readouterr().out
    assert "Throughput" in out and "profiled" in out and "paper's recipe" in out


def test_the_paper_recipe_is_projected_from_an_epochs_train_and_test_speed():
    # 500 epochs of 50,000 train images at 50,000 img/s and 10,000 test images at 100,000 img/s: 500 * 1.1 s.
    row = {"train_images_per_second": 50_000.0, "eval_images_per_second": 100_000.0}
    assert bench.paper_recipe_minutes(row) == pytest.approx(500 * 1.1 / 60)


def test_program_counts_reads_fusions_custom_calls_and_loops_from_hlo_text():
    hlo = """ENTRY %main {
  %a = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, calls=%fused
  %b = (f32[4]{0}) custom-call(f32[4]{0} %a), custom_call_target="__gpu$xla.gpu.triton"
  %c = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %t), condition=%cond, body=%body
  ROOT %d = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%fused.1
}"""
    counts = bench.program_counts(hlo)
    assert (counts["fusions"], counts["custom_calls"], counts["while_loops"]) == (2, 1, 1)


def test_cpu_profile_splits_the_step_into_the_nmf_iterations_and_the_rest(tmp_path, capsys):
    bench.main(["--profile", "--tiny", "--output", str(tmp_path)])
    profile = json.loads((tmp_path / "profile-cpu.json").read_text())
    # Both parts were found in the trace: the loops' instructions by the op's name, the rest by theirs.
    assert profile["nmf_iterations_ms"] > 0 and profile["rest_ms"] > 0
    # With the configs' kernel "auto" a CPU with AVX-512 runs the iterations in the C++ kernel: one call
    # per NMF layer.
    calls = 4 if kernels.cpu_kernel_applies("float32", jnp.float32, "native") else 0
    assert profile["kernel"] == "auto" and profile["nmf_kernel_calls"] == calls
    assert profile["operations_ms_per_device_step"] == pytest.approx(profile["nmf_iterations_ms"] + profile["rest_ms"])
    assert profile["top_rest"] and all(row["shape"] and row["ms"] > 0 for row in profile["top_rest"])
    assert "NMF forward iterations ms" in capsys.readouterr().out


def test_nmf_loop_instructions_are_those_of_the_ops_while_bodies_only():
    hlo = "\n".join(
        [
            "%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {",
            "  %p = (s32[], f32[4]) parameter(0)",
            "  ROOT %ynn_fusion.3 = f32[4]{0} fusion(%p), kind=kCustom",
            "}",
            "%body.2 (q: (s32[], u32[4])) -> (s32[], u32[4]) {",
            "  ROOT %threefry.1 = u32[4]{0} fusion(%q), kind=kLoop",
            "}",
            "ENTRY %main {",
            "  %while.1 = (s32[], f32[4]) while(%t), condition=%c.1, body=%body.1, "
            'metadata={op_name="jit(f)/jvp(jit(_nmf))/while"}',
            "  %while.2 = (s32[], u32[4]) while(%u), condition=%c.2, body=%body.2, "
            'metadata={op_name="jit(f)/augment/while"}',
            "}",
        ]
    )
    assert bench.nmf_loop_instructions(hlo) == {"p", "ynn_fusion.3"}


def test_the_unroll_study_compares_the_loop_and_its_unrolled_form(tmp_path, capsys):
    bench.main(["--unroll", "--tiny", "--output", str(tmp_path)])
    written = json.loads((tmp_path / "unroll.json").read_text())
    assert [(row["model"], row["kernel"]) for row in written["rows"]] == [
        ("cnmf_1x1", "xla"),
        ("cnmf_1x1", "xla_unrolled"),
    ]
    assert all(row["train_compile_seconds"] > 0 and row["train_images_per_second"] > 0 for row in written["rows"])
    assert written["peak_gflops"] > 0 and "xla_unrolled" in capsys.readouterr().out


def test_the_bfloat16_study_has_each_precision_as_train_py_runs_it_then_with_xlas_loop():
    path = ops.cpu_bfloat16_path()
    # Each precision as train.py runs it (kernel "auto"), then where that was the C++ kernel with XLA's
    # backward, and with XLA's loop.
    by_kernel = {
        precision: kernels.cpu_kernel_applies(precision, jnp.float32, path) for precision in ("float32", "bfloat16")
    }
    names = {"float32": "float32", "bfloat16": f"bfloat16 {path}"}
    expected = [f"{names[p]}, {'C++ kernel' if by_kernel[p] else 'XLA loop'}" for p in ("float32", "bfloat16")]
    twins = [p for p in ("float32", "bfloat16") if by_kernel[p]]
    expected += [f"{names[p]}, C++ kernel forward, XLA backward" for p in twins]
    expected += [f"{names[p]}, XLA loop" for p in twins]
    expected += ["bfloat16 emulated, XLA loop"] if path == "native" else []
    variants = bench_bfloat16._variants()
    assert [variant.name for variant in variants] == expected
    assert [variant.kernel for variant in variants] == ["auto"] * (2 + len(twins)) + ["xla"] * (
        len(expected) - 2 - len(twins)
    )
    assert [variant.xla_backward for variant in variants] == [False, False] + [True] * len(twins) + [False] * (
        len(expected) - 2 - len(twins)
    )
    # Each against its own peak: the native products against bfloat16's, the emulation against float32's.
    assert [variant.peak for variant in variants] == [
        "bfloat16" if name.startswith("bfloat16 native") else "float32" for name in expected
    ]


def test_the_bfloat16_study_sets_each_path_against_float32_and_its_own_peak(tmp_path, capsys, monkeypatch):
    # Its rows as train.py runs each precision (the XLA-loop twins and the emulation: the test above).
    rows = [v for v in bench_bfloat16._variants() if v.kernel == "auto" and not v.xla_backward]
    monkeypatch.setattr(bench_bfloat16, "_variants", lambda: rows)
    bench.main(["--bfloat16", "--tiny", "--output", str(tmp_path)])
    written = json.loads((tmp_path / "bfloat16.json").read_text())
    path = ops.cpu_bfloat16_path()
    by_kernel = {
        precision: kernels.cpu_kernel_applies(precision, jnp.float32, path) for precision in ("float32", "bfloat16")
    }
    assert [row["variant"] for row in written["rows"]] == [variant.name for variant in rows]
    assert [row["kernel"] for row in written["rows"]] == [variant.kernel for variant in rows]
    assert written["bfloat16_path"] == path and written["peak_gflops"]["bfloat16"] > 0
    assert written["cpu_kernel_bfloat16_units"] == cpu_kernel.bfloat16_units()
    float32, *lower = written["rows"]
    assert float32["train_speedup"] == float32["loop_train_speedup"] == 1.0
    for row in written["rows"]:
        # Each against its own peak: the native products against bfloat16's, the emulation against float32's.
        own = "bfloat16" if row["variant"].startswith("bfloat16 native") else "float32"
        assert row["peak_gflops"] == written["peak_gflops"][own]
        assert row["train_fraction_of_peak"] == pytest.approx(row["train_gflop_per_second"] / row["peak_gflops"])
        assert row["precision"] == row["variant"].split()[0].rstrip(",")
    # The speed-ups are ratios within a round (one round at the tiny size).
    assert written["rounds"] == 1 and all(len(rounds) == 1 for rounds in written["measured"].values())
    for row in lower:
        (mine,), (reference,) = written["measured"][row["variant"]], written["measured"][float32["variant"]]
        for key in ("train", "eval", "loop_train", "loop_eval"):
            ratio = mine[f"{key}_images_per_second"] / reference[f"{key}_images_per_second"]
            assert row[f"{key}_speedup"] == pytest.approx(ratio)
    # The profiles run as train.py does: the C++ kernel's calls where it takes the precision.
    profiles = {profile["precision"]: profile for profile in written["profiles"]}
    for precision, profile in profiles.items():
        assert (profile["nmf_kernel_calls"] > 0) == by_kernel[precision] and profile["kernel"] == "auto"
        assert profile["nmf_iterations_ms"] > 0 and profile["rest_ms"] > 0
        # ... and the one-step backward's calls, one per NMF layer, where the kernel runs
        assert profile["nmf_backward_kernel_calls"] == profile["nmf_kernel_calls"]
        assert (profile["nmf_backward_kernel_ms"] > 0) == by_kernel[precision]
    assert "(bf16 units: " in capsys.readouterr().out


# --- the fused C++ kernel against XLA's loop (--cpu_kernel) ---


def test_each_nmf_layer_runs_alone_with_both_kernels_and_they_agree():
    if not cpu_kernel.available():
        pytest.skip(f"the CPU kernel cannot be built here: {cpu_kernel.unavailable_reason()}")
    rows = bench.measure_layers(batch_size=2, devices=1, iterations=2, repeats=1)
    # CNMF+1x1's four NMF layers at batch 2: 2 x 24 x 24 positions in block 1, one per image in blocks 3-4.
    assert [(row["positions"], row["features"], row["hidden"]) for row in rows] == [
        (1152, 75, 32),
        (128, 800, 64),
        (2, 1024, 96),
        (2, 96, 10),
    ]
    for row in rows:
        assert row["xla_ms"] > 0 and row["cpu_ms"] > 0 and row["speedup"] == row["xla_ms"] / row["cpu_ms"]
        assert row["max_relative_difference"] < 2e-5


def test_a_kernel_step_is_counted_with_the_flops_of_xlas_loop():
    # XLA's cost analysis counts nothing inside the kernel's call: the row counts the XLA program's FLOPs.
    if not cpu_kernel.available():
        pytest.skip(f"the CPU kernel cannot be built here: {cpu_kernel.unavailable_reason()}")
    rows = {
        kernel: bench.measure_train_and_eval("cnmf_1x1", 2, 1, 100.0, iterations=2, devices=1, kernel=kernel)
        for kernel in ("xla", "cpu")
    }

    def eval_flops_per_image(row):
        return row["eval_gflop_per_second"] / row["eval_images_per_second"]

    assert eval_flops_per_image(rows["cpu"]) == pytest.approx(eval_flops_per_image(rows["xla"]), rel=1e-9)
    assert rows["cpu"]["train_gflops_per_image"] == rows["xla"]["train_gflops_per_image"]


def test_the_cpu_kernel_study_sets_the_kernel_against_xlas_loop_and_the_peak(tmp_path, capsys):
    if not cpu_kernel.available():
        pytest.skip(f"the CPU kernel cannot be built here: {cpu_kernel.unavailable_reason()}")
    bench.main(["--cpu_kernel", "--tiny", "--output", str(tmp_path)])
    written = json.loads((tmp_path / "cpu_kernel.json").read_text())
    assert (written["rounds"], written["iterations"], written["peak_size"]) == (1, 2, bench.PEAK_SIZE)
    assert written["peak_gflops"] > 0 and len(written["layers"]) == 4
    assert written["vector_bits"] == cpu_kernel.vector_bits() in (256, 512)
    xla, kernel = written["rows"]
    assert (xla["variant"], kernel["variant"]) == ("xla", "cpu")
    (mine,), (theirs,) = written["measured"]["cpu"], written["measured"]["xla"]  # one round each
    for key in ("train", "eval", "loop_train", "loop_eval"):
        assert xla[f"{key}_speedup"] == 1.0
        assert kernel[f"{key}_speedup"] == pytest.approx(
            mine[f"{key}_images_per_second"] / theirs[f"{key}_images_per_second"]
        )
    for row in written["rows"]:
        assert row["train_fraction_of_peak"] == pytest.approx(row["train_gflop_per_second"] / written["peak_gflops"])
    out = capsys.readouterr().out
    assert "kernel x XLA" in out and "train.py train x XLA" in out and "wrote" in out


def test_the_cpu_kernel_study_without_the_kernel_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    monkeypatch.setattr(cpu_kernel, "unavailable_reason", lambda: "no C++ compiler ('c++')")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--cpu_kernel", "--tiny", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: the CPU kernel cannot be built here: no C++ compiler ('c++')"
    assert not (tmp_path / "cpu_kernel.json").exists()


# --- the fused kernel compiled for NVIDIA GPUs without one (--triton) ---


def test_the_kernels_calls_come_out_of_the_cuda_lowered_network():
    from nmfjax import kernels
    from nmfjax.bench import triton as triton_check

    calls = triton_check.kernel_calls("cnmf_1x1", batch_size=50)
    # One call per NMF layer, its positions (rows) padded to the tile, S and I to powers of two,
    # each launched as the rule plans it for an H100.
    assert [(call["x"], call["w"]) for call in calls] == [
        ("28800 x 128", "128 x 32"),
        ("3200 x 1024", "1024 x 64"),
        ("64 x 1024", "1024 x 128"),
        ("64 x 128", "128 x 16"),
    ]
    assert [(call["position_tile"], call["grid"]) for call in calls] == [(128, 225), (16, 200), (16, 4), (16, 4)]
    assert [call["auto"] for call in calls] == ["kernel", "kernel", "XLA", "XLA"]
    for call, (positions, features, hidden) in zip(
        calls, [(28800, 75, 32), (3200, 800, 64), (50, 1024, 96), (50, 96, 10)], strict=True
    ):
        planned = kernels.launch_parameters(positions, features, hidden, "float32", kernels.H100)
        assert (call["feature_chunk"], call["num_warps"], call["num_stages"]) == (
            planned.feature_chunk,
            planned.num_warps,
            planned.num_stages,
        )
        assert call["ir"].startswith(b"ML\xefR")  # MLIR bytecode
    # Planned for an A100, tf32's second block keeps 16-row tiles (mma.sync); on an H100, wgmma's 64.
    assert triton_check.kernel_calls("cnmf_1x1", 50, "tf32", kernels.A100)[1]["position_tile"] == 16
    assert triton_check.kernel_calls("cnmf_1x1", 50, "tf32", kernels.H100)[1]["position_tile"] == 64


@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_the_kernel_compiles_for_sm_90_with_triton_without_spills(precision):
    pytest.importorskip("triton", reason="pip's triton compiles the kernel: pip install triton==3.8.0 (jaxlib 0.10.2)")
    from nmfjax.bench import triton as triton_check

    # Block 2 at the paper's batch: the layer that spilled before the launch rule.
    call = triton_check.kernel_calls("cnmf_1x1", batch_size=50, precision=precision)[1]
    row = triton_check.compile_call(call, 90)
    assert row["target"] == "sm_90" and 0 < row["registers"] <= 255
    assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0
    if precision == "float32":
        assert row["products"] == "FFMA" and row["count_FFMA"] > 0  # float32: no tensor cores
    else:
        assert row["count_HGMMA"] > 0 and row["count_HMMA"] == 0  # Hopper's wgmma, not mma.sync
