"""The command line of ``python -m nmfjax.bench`` and the whole CPU suite."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Any

import jax

from nmfjax import cli, parallel, plots
from nmfjax.bench.bfloat16 import bfloat16_study
from nmfjax.bench.figure1 import FIGURE1_COLUMNS, figure1
from nmfjax.bench.fused_cpu import cpu_kernel_study
from nmfjax.bench.gpu import GPU_FULL, GPU_TINY, gpu_suite, gpus
from nmfjax.bench.loop import LOOP_COLUMNS, measure_loop
from nmfjax.bench.peak import PEAK_SIZE, cpu_name, measure_peak_gflops
from nmfjax.bench.precision import precision_study
from nmfjax.bench.profile import CPU_PROFILE_COLUMNS, TOP_REST_COLUMNS, cpu_profile
from nmfjax.bench.throughput import (
    FULL,
    SCALING_COLUMNS,
    THROUGHPUT_COLUMNS,
    TINY,
    UNROLL_COLUMNS,
    Sizes,
    measure_train_and_eval,
    scaling,
    unroll_study,
)
from nmfjax.bench.triton import TRITON_COLUMNS, triton_check
from nmfjax.outputs import storage_errors, write_output
from nmfjax.tables import markdown_table


def run(sizes: Sizes, output: pathlib.Path) -> dict:
    """The whole suite: prints its tables and writes ``bench.json`` and ``bench.png`` to ``output``."""
    # One device next to all of them (one per core by default), measured in the same process.
    device_counts = sorted({1, jax.device_count()})
    # The yardstick of every row: this machine's float32 products, on the devices the row uses.
    peaks = {count: measure_peak_gflops(jax.devices()[:count], repeats=sizes.repeats) for count in device_counts}
    results: dict[str, Any] = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "cpu": cpu_name(),
        "jax": jax.__version__,
        "peak_size": PEAK_SIZE,
        "peak_gflops": {str(count): peak for count, peak in peaks.items()},
        "repeats": sizes.repeats,
    }
    peak_line = ", ".join(f"{peak:.0f} on {count} device(s)" for count, peak in peaks.items())
    print(f"{results['cpu']}: float32 peak {peak_line} (GFLOP/s, {PEAK_SIZE}x{PEAK_SIZE} products)", flush=True)
    results["throughput"] = [
        measure_train_and_eval(model, batch, sizes.repeats, peaks[count], devices=count)
        for model in sizes.models
        for batch in sizes.batch_sizes
        for count in device_counts
    ]
    print("\nThroughput (N=20):\n" + markdown_table(results["throughput"], THROUGHPUT_COLUMNS), flush=True)
    all_devices = parallel.largest_dividing_count(jax.device_count(), (sizes.loop_batch,))
    results["loop"] = [
        measure_loop(model, sizes.loop_batch, peaks[all_devices], sizes.loop_steps, sizes.repeats)
        for model in sizes.loop_models
    ]
    print("\ntrain.py's epoch against the bare step:\n" + markdown_table(results["loop"], LOOP_COLUMNS), flush=True)
    results["figure1"] = figure1(sizes)
    print(
        "\nFigure 1 (backward of the whole network):\n" + markdown_table(results["figure1"], FIGURE1_COLUMNS),
        flush=True,
    )
    results["scaling"] = scaling(sizes, peaks, results["throughput"])
    for name, rows in results["scaling"].items():
        print(f"\nCNMF+1x1 against {name}:\n" + markdown_table(rows, SCALING_COLUMNS), flush=True)
    write_output(output / "bench.json", json.dumps(results, indent=2))
    plots.plot_bench(results, output / "bench.png")
    print(f"\nwrote {output / 'bench.json'} and {output / 'bench.png'}")
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m nmfjax.bench``."""
    parser = cli.ArgumentParser(
        prog="python -m nmfjax.bench",
        description=cli.package_help(__name__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default="bench", help="folder for bench.json and bench.png")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    parser.add_argument("--repeats", type=cli.positive_int, help="timed calls per figure (default 5; tiny: 2)")
    parser.add_argument(
        "--cpu_devices", type=cli.positive_int, help="XLA devices on a CPU (default: one per core; XLA_FLAGS wins)"
    )
    suite = parser.add_mutually_exclusive_group()
    suite.add_argument("--precision", action="store_true", help="the op in tf32 and bfloat16 against float32")
    suite.add_argument("--profile", action="store_true", help="where a CNMF+1x1 train step's time goes on a CPU")
    suite.add_argument(
        "--unroll", action="store_true", help="compile time and speed of the NMF loop unrolled (model.nmf.unroll)"
    )
    suite.add_argument(
        "--triton", action="store_true", help="the fused kernel compiled for sm_90 and sm_80 by pip's triton (no GPU)"
    )
    suite.add_argument(
        "--bfloat16", action="store_true", help="CNMF+1x1 at bfloat16 against float32 on a CPU, each to its own peak"
    )
    suite.add_argument(
        "--cpu_kernel", action="store_true", help="the fused C++ kernel against XLA's loop on a CPU, to the peak"
    )
    suite.add_argument("--gpu", action="store_true", help="the GPU table (needs a GPU and --data_dir)")
    parser.add_argument("--data_dir", help="TFDS data directory with CIFAR-10, for --gpu's training run")
    args = parser.parse_args(argv)
    # One device per core; each measurement uses as many of them as divide its batch.
    parallel.use_cpu_devices(args.cpu_devices)
    output = pathlib.Path(args.output)
    if output.exists() and not output.is_dir():
        cli.fail(f"--output {output} is a file; give a folder for bench.json and bench.png.")
    with cli.exit_on_errors(), storage_errors(output, "Choose another --output."):
        output.mkdir(parents=True, exist_ok=True)  # before minutes of measuring
    with cli.exit_on_errors():
        if args.gpu:
            gpu = gpus()[0]
            if not args.data_dir:
                cli.fail("--gpu trains for one epoch on CIFAR-10: give its TFDS data directory as --data_dir.")
            gpu_sizes = GPU_TINY if args.tiny else GPU_FULL
            repeats = args.repeats or gpu_sizes.repeats
            gpu_suite(gpu, args.data_dir, output, dataclasses.replace(gpu_sizes, repeats=repeats))
            return
        if args.profile:
            profile = cpu_profile(*(("cnmf_1x1", 4, 2, 2) if args.tiny else ()))
            print(markdown_table([profile], CPU_PROFILE_COLUMNS))
            print(markdown_table(profile["top_rest"], TOP_REST_COLUMNS))
            write_output(output / "profile-cpu.json", json.dumps(profile, indent=2))
            print(f"wrote {output / 'profile-cpu.json'}")
            return
        if args.precision:
            precision_study(output, *(((2,), 64) if args.tiny else ()))
            return
        if args.triton:
            check = triton_check(*((4, ("float32",)) if args.tiny else ()))
            print(
                f"The fused kernel at batch {check['batch_size']}, compiled by triton {check['triton']} "
                f"(jaxlib {check['jaxlib']}):\n" + markdown_table(check["rows"], TRITON_COLUMNS)
            )
            write_output(output / "triton.json", json.dumps(check, indent=2))
            print(f"wrote {output / 'triton.json'}")
            return
    sizes = TINY if args.tiny else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    if args.unroll:
        write_unroll_study(sizes, output, iterations=2 if args.tiny else 20)
        return
    if args.bfloat16:
        bfloat16_study(sizes, output, rounds=1 if args.tiny else 4)
        return
    if args.cpu_kernel:
        with cli.exit_on_errors():
            cpu_kernel_study(sizes, output, *((1, 2) if args.tiny else ()))
        return
    run(sizes, output)


def write_unroll_study(sizes: Sizes, output: pathlib.Path, iterations: int = 20) -> dict:
    """``--unroll``: :func:`~nmfjax.bench.throughput.unroll_study` with the machine's peak, printed and
    written to ``unroll.json``.
    """
    devices = parallel.largest_dividing_count(jax.device_count(), (sizes.loop_batch,))
    peak = measure_peak_gflops(jax.devices()[:devices], repeats=sizes.repeats)
    results: dict[str, Any] = {"cpu": cpu_name(), "jax": jax.__version__, "peak_gflops": peak}
    results["rows"] = unroll_study(sizes, peak, iterations)
    print(f"The NMF loop, and unrolled (N = {iterations}):\n" + markdown_table(results["rows"], UNROLL_COLUMNS))
    write_output(output / "unroll.json", json.dumps(results, indent=2))
    print(f"wrote {output / 'unroll.json'}")
    return results
