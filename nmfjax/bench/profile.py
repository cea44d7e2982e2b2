"""A profile of one train step: what the compiled program holds (kernels, custom calls, while loops,
whose conditions go to the host on a GPU) and, from a trace of a few steps, the device's kernels per
step and their time.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import tempfile
import time
from typing import Any

import jax

from nmfjax import cpu_kernel
from nmfjax.bench.throughput import nmf_variant, synthetic_train_step


def program_counts(hlo_text: str) -> dict[str, int]:
    """Counts in an optimised HLO module's text: fusions (each a kernel), custom calls (cuBLAS, the
    fused NMF kernel's Triton call), while loops, and the module's size.
    """
    # "%name = SHAPE opcode(operands), ...", SHAPE a tuple "(...)" or one array shape.
    opcode = re.compile(r"^\s*(?:ROOT\s+)?%[\w.-]+\s*=\s*(?:\([^)]*\)|\S+)\s+([\w-]+)\(")
    counts = collections.Counter(match.group(1) for line in hlo_text.splitlines() if (match := opcode.match(line)))
    return {
        "fusions": counts["fusion"],
        "custom_calls": counts["custom-call"],
        "while_loops": counts["while"],
        "hlo_chars": len(hlo_text),
    }


def _trace_events(trace_dir: pathlib.Path) -> list[dict]:
    """The events of the Perfetto trace that ``jax.profiler.trace(..., create_perfetto_trace=True)``
    wrote under ``trace_dir``.
    """
    (path,) = trace_dir.rglob("perfetto_trace.json.gz")
    trace = json.loads(gzip.decompress(path.read_bytes()))
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _traced_steps(compiled, arguments: tuple, steps: int, read) -> tuple[float, list]:
    """Runs the compiled train step ``steps`` times on ``arguments`` (its state threaded through,
    after two warm-up steps) under ``jax.profiler``; returns the wall seconds and ``read(trace_dir)``.
    """
    state, rest = arguments[0], arguments[1:]
    for _ in range(2):  # warm up
        state, _ = compiled(state, *rest)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                state, _ = compiled(state, *rest)
            jax.block_until_ready(state)
            wall = time.perf_counter() - start
        return wall, read(pathlib.Path(trace_dir))


def device_events(trace_dir: pathlib.Path) -> list[tuple[str, float]]:
    """``(name, milliseconds)`` of every event on a device (``/device:...`` processes) in the Perfetto
    trace under ``trace_dir``.
    """
    events = _trace_events(trace_dir)
    devices = {
        event["pid"]
        for event in events
        if event.get("ph") == "M" and event.get("name") == "process_name"
        if str(event.get("args", {}).get("name", "")).startswith("/device:")
    }
    return [
        (event["name"], event["dur"] / 1e3) for event in events if event.get("ph") == "X" and event["pid"] in devices
    ]


def profile_step(model: str, batch_size: int, kernel: str, steps: int = 20, iterations: int = 20) -> dict:
    """The train step of ``model`` at ``batch_size`` with the NMF op's ``kernel``: its program's counts,
    its wall time per step over ``steps`` steps, and the device's kernels per step (their count, busy
    time and the 15 that take longest) from a trace of those steps.
    """
    trainer, _, (state, images, labels, batch, key, totals) = synthetic_train_step(
        model, batch_size, iterations, **nmf_variant(kernel)
    )
    compiled = trainer.train_step.lower(state, images, labels, batch, key, totals).compile()
    wall, events = _traced_steps(compiled, (state, images, labels, batch, key, totals), steps, device_events)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, milliseconds in events:
        by_name[name].append(milliseconds)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    return {
        "model": model,
        "batch_size": batch_size,
        "kernel": kernel,
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        **program_counts(compiled.as_text() or ""),
        "device_events_per_step": len(events) / steps,
        "device_busy_ms_per_step": sum(ms for _, ms in events) / steps,
        "top_kernels": [
            {"name": name, "per_step": len(times) / steps, "ms_per_step": sum(times) / steps} for name, times in top
        ],
    }


PROFILE_COLUMNS = [
    ("model", "model", "s"),
    ("batch", "batch_size", "d"),
    ("kernel", "kernel", "s"),
    ("wall ms/step", "wall_ms_per_step", ".2f"),
    ("device kernels/step", "device_events_per_step", ".0f"),
    ("device busy ms/step", "device_busy_ms_per_step", ".2f"),
    ("fusions", "fusions", "d"),
    ("custom calls", "custom_calls", "d"),
    ("while loops", "while_loops", "d"),
]


def nmf_loop_instructions(hlo_text: str) -> set[str]:
    """Names of the instructions in the bodies of the NMF op's while loops (the N forward iterations)
    in an optimised HLO module's text: the loops whose ``op_name`` comes from :func:`nmfjax.ops.nmf`.
    """
    bodies = set(re.findall(r"while\(.*?body=%([\w.-]+).*?op_name=\"[^\"]*_nmf[^\"]*/while\"", hlo_text))
    names: set[str] = set()
    body = None
    for line in hlo_text.splitlines():
        if header := re.match(r"^%([\w.-]+) ", line):
            body = header.group(1) if header.group(1) in bodies else None
        elif line.startswith("}"):
            body = None
        elif body and (instruction := re.match(r"^\s*(?:ROOT\s+)?%([\w.-]+)\s*=", line)):
            names.add(instruction.group(1))
    return names


def nmf_loop_products(hlo_text: str, in_loops: set[str] | None = None) -> tuple[int, int]:
    """The matrix products in the NMF op's forward loops of an optimised HLO module's text (XLA's
    CPU dot fusions, or dots), and how many of them take a bfloat16 operand.
    """
    if in_loops is None:
        in_loops = nmf_loop_instructions(hlo_text)
    definitions = dict(re.findall(r"^\s*(?:ROOT\s+)?%([\w.-]+)\s*=\s*(.*)$", hlo_text, re.MULTILINE))
    types = dict(re.findall(r"^\s*(?:ROOT\s+)?%([\w.-]+)\s*=\s*(\w+)\[", hlo_text, re.MULTILINE))
    products = [
        text
        for name, text in definitions.items()
        if name in in_loops and "dot_general" in text and ("kind=kCustom" in text or " dot(" in text)
    ]

    def takes_bfloat16(text: str) -> bool:
        operands = re.search(r"(?:fusion|dot)\(([^)]*)\)", text)
        return any(
            types.get(name) == "bf16" for name in re.findall(r"%([\w.-]+)", operands.group(1) if operands else "")
        )

    return len(products), sum(takes_bfloat16(text) for text in products)


def thread_events(trace_dir: pathlib.Path) -> list[tuple[str, str, float]]:
    """``(thread, name, milliseconds)`` of every complete event in the Perfetto trace under ``trace_dir``."""
    events = _trace_events(trace_dir)
    threads = {
        (event["pid"], event["tid"]): str(event.get("args", {}).get("name", ""))
        for event in events
        if event.get("ph") == "M" and event.get("name") == "thread_name"
    }
    return [
        (threads.get((event["pid"], event["tid"]), ""), event["name"], event["dur"] / 1e3)
        for event in events
        if event.get("ph") == "X"
    ]


def nmf_kernel_calls(hlo_text: str, target: str = cpu_kernel.TARGET) -> set[str]:
    """Names of the calls of :mod:`nmfjax.cpu_kernel` in an optimised HLO module's text: of its forward
    (all N iterations of a layer each), or of ``target`` (:data:`nmfjax.cpu_kernel.BACKWARD_TARGET`).
    """
    pattern = rf"^\s*(?:ROOT\s+)?%([\w.-]+)\s*=.*custom_call_target=\"{target}\""
    return set(re.findall(pattern, hlo_text, re.MULTILINE))


def cpu_profile(
    model: str = "cnmf_1x1",
    batch_size: int = 50,
    steps: int = 10,
    iterations: int = 20,
    precision: str = "float32",
    kernel: str | None = None,
) -> dict:
    """Where a train step's time goes on a CPU: the XLA operations that each device ran (its thunks,
    from a trace of ``steps`` steps), split into the NMF op's forward iterations (the bodies of XLA's
    loops, or the calls of the C++ kernel) and the rest, per device and step, with the 15 operations
    of the rest that take longest (their HLO shapes); of the rest, ``nmf_backward_kernel_ms`` is the
    C++ kernel's one-step backward (its calls counted). The NMF products in ``precision``, the
    iterations by ``kernel`` (default: the config's, as ``train.py``); ``nmf_loop_products`` counts
    the products of XLA's forward loops (its CPU dot fusions) and ``bfloat16_loop_products`` those of
    them that take bfloat16 operands.
    """
    fields: dict[str, Any] = {} if kernel is None else {"kernel": kernel}
    trainer, spec, (state, images, labels, batch, key, totals) = synthetic_train_step(
        model, batch_size, iterations, precision=precision, **fields
    )
    compiled = trainer.train_step.lower(state, images, labels, batch, key, totals).compile()
    hlo = compiled.as_text() or ""
    in_loops = nmf_loop_instructions(hlo) | nmf_kernel_calls(hlo)
    shapes = dict(re.findall(r"^\s*(?:ROOT\s+)?%([\w.-]+)\s*=\s*(\([^)]*\)|\S+)\s", hlo, re.MULTILINE))
    wall, events = _traced_steps(compiled, (state, images, labels, batch, key, totals), steps, thread_events)
    # The operations are the events named after an instruction of the program (not its while loops,
    # which contain others); they run on XLA's threads, one device's share each.
    per_step = 1 / (steps * trainer.mesh.size)
    operations: dict[str, float] = collections.defaultdict(float)
    for _, name, milliseconds in events:
        if name in shapes and not name.startswith("while"):
            operations[name] += milliseconds * per_step
    loops = sum(ms for name, ms in operations.items() if name in in_loops)
    rest = {name: ms for name, ms in operations.items() if name not in in_loops}
    backward_calls = nmf_kernel_calls(hlo, cpu_kernel.BACKWARD_TARGET)
    top = sorted(rest.items(), key=lambda item: -item[1])[:15]
    loop_products, bfloat16_products = nmf_loop_products(hlo, in_loops)
    return {
        "model": model,
        "batch_size": batch_size,
        "precision": precision,
        "kernel": spec.nmf.kernel,
        "nmf_kernel_calls": len(nmf_kernel_calls(hlo)),
        "nmf_loop_products": loop_products,
        "bfloat16_loop_products": bfloat16_products,
        "devices": trainer.mesh.size,
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "operations_ms_per_device_step": sum(operations.values()),
        "nmf_iterations_ms": loops,
        "rest_ms": sum(rest.values()),
        "nmf_backward_kernel_calls": len(backward_calls),
        "nmf_backward_kernel_ms": sum(ms for name, ms in rest.items() if name in backward_calls),
        "top_rest": [{"name": name, "shape": shapes[name], "ms": ms} for name, ms in top],
    }


CPU_PROFILE_COLUMNS = [
    ("model", "model", "s"),
    ("batch", "batch_size", "d"),
    ("devices", "devices", "d"),
    ("wall ms/step", "wall_ms_per_step", ".1f"),
    ("operations ms/step/device", "operations_ms_per_device_step", ".1f"),
    ("NMF forward iterations ms", "nmf_iterations_ms", ".1f"),
    ("the rest ms", "rest_ms", ".1f"),
]
TOP_REST_COLUMNS = [("the rest: operation", "name", "s"), ("shape", "shape", "s"), ("ms/step/device", "ms", ".2f")]
