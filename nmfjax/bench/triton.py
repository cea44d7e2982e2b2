"""What the fused NMF kernel compiles to on NVIDIA GPUs, checked on a machine without one.

``jax.export`` lowers each network's forward pass for CUDA with
``kernel="pallas"``; every NMF layer is one Triton custom call whose backend
config holds the kernel's Triton IR (MLIR bytecode), its grid and its launch
parameters. pip's ``triton`` compiles that IR for a GPU target (TTIR, TTGIR,
LLVM, PTX), its bundled ``ptxas -v`` reports registers and spills, and its
``cuobjdump -sass`` the instructions the products run on (``FFMA``: float32
fused multiply-adds; ``HMMA``: tensor cores, ``mma.sync``; ``HGMMA``: Hopper's
``wgmma``).

The Triton IR's bytecode must be readable by pip's triton: jaxlib builds its own
Triton, so the versions have to match (:data:`MATCHING_TRITON`).

    python -m nmfjax.bench --triton --output docs/gpu/triton
"""

from __future__ import annotations

import collections
import importlib.metadata
import pathlib
import re
import subprocess
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import export

from nmfjax import configuration, kernels, models, ops
from nmfjax.errors import ConfigError

#: jaxlib's version -> the pip ``triton`` that parses the Triton IR it writes (checked by running this module).
MATCHING_TRITON = {"0.10.2": "3.8.0"}

#: The GPUs checked, by compute capability; the launch rule plans each export for one of them.
TARGETS = {90: kernels.H100, 80: kernels.A100}

#: SASS instructions that tell where the products run.
PRODUCT_INSTRUCTIONS = ("FFMA", "HMMA", "HGMMA")


def kernel_calls(
    model: str, batch_size: int = 50, precision: str = "float32", target: kernels.GpuTarget = kernels.H100
) -> list[dict[str, Any]]:
    """The fused kernel's calls in the CUDA-lowered forward pass of ``model`` (the paper's network,
    ``kernel="pallas"``) at ``batch_size``, launches planned for ``target``: per NMF layer, its
    operands' shapes, grid, launch parameters, whether ``kernel="auto"`` takes it, and its Triton IR
    (bytes).
    """
    config = configuration.default_config()
    config.model.architecture = model
    config.model.nmf.kernel = "pallas"
    config.model.nmf.precision = precision
    spec = configuration.network_spec(config)
    network = models.build(spec, 0)
    network.eval()
    graphdef, state = nnx.split(network)
    images = jax.ShapeDtypeStruct((batch_size, *spec.input_shape), jnp.float32)
    forward = jax.jit(lambda state, images: nnx.merge(graphdef, state).logits(images))
    with kernels.planning_for(target):
        exported = export.export(
            forward,
            platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call(kernels.TRITON_CALL_TARGET)],
        )(jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), state), images)
    calls = _triton_calls(exported.mlir_module())
    for call in calls:
        positions = int(call["x"].split(" x ")[0])
        call["position_tile"] = positions // call["grid"]
        chunk = re.search(r"chunk(\d+)", call["name"])
        if chunk is None:
            raise RuntimeError(f"the kernel call's name {call['name']!r} carries no feature chunk")
        call["feature_chunk"] = int(chunk.group(1))
        # (the grid of the padded positions is the grid of the layer's own)
        launch = kernels.LaunchParameters(position_tile=call["position_tile"])
        call["auto"] = "kernel" if kernels.fills_gpu(positions, launch, target) else "XLA"
    return calls


def _triton_calls(module_text: str) -> list[dict[str, Any]]:
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    module = ir.Module.parse(module_text, context=jax_mlir.make_ir_context())
    calls: list[dict[str, Any]] = []

    def walk(operation) -> None:
        for region in operation.regions:
            for block in region.blocks:
                for inner in block.operations:
                    op = inner.operation
                    if op.name == "stablehlo.custom_call" and kernels.TRITON_CALL_TARGET in str(
                        op.attributes["call_target_name"]
                    ):
                        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                        calls.append(
                            {
                                "layer": len(calls) + 1,
                                "x": _shape(ir.RankedTensorType(op.operands[0].type).shape),
                                "w": _shape(ir.RankedTensorType(op.operands[1].type).shape),
                                "grid": ir.IntegerAttr(config["grid_x"]).value,
                                "num_warps": ir.IntegerAttr(config["num_warps"]).value,
                                "num_stages": ir.IntegerAttr(config["num_stages"]).value,
                                "name": ir.StringAttr(config["name"]).value,
                                "ir": ir.StringAttr(config["ir"]).value_bytes,
                            }
                        )
                    walk(op)

    walk(module.operation)
    return calls


def _shape(dimensions) -> str:
    return " x ".join(str(size) for size in dimensions)


def _tool(name: str) -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _check_triton_version() -> str:
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = None
    jaxlib = importlib.metadata.version("jaxlib")
    wanted = MATCHING_TRITON.get(jaxlib)
    if version is None or (wanted is not None and version != wanted):
        advice = f"pip install triton=={wanted}" if wanted else "the triton release that jaxlib's Triton was cut from"
        found = f"triton {version} is installed" if version else "triton is not installed"
        raise ConfigError(f"--triton compiles the kernel with pip's triton: {found}; jaxlib {jaxlib} needs {advice}.")
    return version


def _numbers(pattern: str, report: str) -> list[int]:
    """The integers ``pattern`` captures in ptxas's report."""
    found = re.search(pattern, report)
    if found is None:
        raise RuntimeError(f"ptxas's report has no {pattern!r}:\n{report}")
    return [int(group) for group in found.groups()]


def compile_call(call: dict[str, Any], capability: int) -> dict[str, Any]:
    """One kernel call compiled for ``sm_<capability>``: registers, spills, shared memory and the
    product instructions of its SASS.
    """
    import triton
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", capability, 32)
    with tempfile.TemporaryDirectory() as scratch:
        directory = pathlib.Path(scratch)
        (directory / "kernel.mlirbc").write_bytes(call["ir"])
        context = triton_ir.context()
        triton_ir.load_dialects(context)
        make_backend(target).load_dialects(context)
        # triton.compile reads text: the bytecode printed as TTIR.
        (directory / "kernel.ttir").write_text(
            str(triton_ir.parse_mlir_module(str(directory / "kernel.mlirbc"), context))
        )
        compiled = triton.compile(
            str(directory / "kernel.ttir"),
            target=target,
            options={"num_warps": call["num_warps"], "num_stages": call["num_stages"]},
        )
        (directory / "kernel.ptx").write_text(compiled.asm["ptx"])
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        report = subprocess.run(
            [
                str(_tool("ptxas")),
                f"-arch={arch}",
                "-v",
                str(directory / "kernel.ptx"),
                "-o",
                str(directory / "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = subprocess.run(
            [str(_tool("cuobjdump")), "-sass", str(directory / "k.cubin")], capture_output=True, text=True, check=True
        ).stdout
    registers = _numbers(r"Used (\d+) registers", report)[0]
    stores, loads = _numbers(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    counts = collections.Counter(re.findall(r"\b(" + "|".join(PRODUCT_INSTRUCTIONS) + r")\b", sass))
    products = [name for name in PRODUCT_INSTRUCTIONS if counts[name]]
    return {
        "target": f"sm_{capability}",
        "registers": registers,
        "spill_store_bytes": stores,
        "spill_load_bytes": loads,
        "shared_memory_kib": compiled.metadata.shared / 1024,
        "products": "+".join(products) or "none",
        **{f"count_{name}": counts[name] for name in PRODUCT_INSTRUCTIONS},
    }


def triton_check(batch_size: int = 50, precisions: tuple[str, ...] = ops.PRECISIONS) -> dict[str, Any]:
    """Every NMF layer of the NMF networks at ``batch_size``, in each of ``precisions``, planned by
    :func:`nmfjax.kernels.launch_parameters` for each of :data:`TARGETS` and compiled for it: one row
    per layer, precision and target.
    """
    version = _check_triton_version()
    rows = []
    for model in models.ARCHITECTURES:
        if not models.NetworkSpec(architecture=model).uses_nmf:
            continue
        for precision in precisions:
            for capability, target in TARGETS.items():
                for call in kernel_calls(model, batch_size, precision, target):
                    shape = {key: value for key, value in call.items() if key not in ("ir", "name")}
                    rows.append({"model": model, "precision": precision, **shape, **compile_call(call, capability)})
    return {
        "jaxlib": importlib.metadata.version("jaxlib"),
        "triton": version,
        "batch_size": batch_size,
        "sm_count": {f"sm_{capability}": target.sm_count for capability, target in TARGETS.items()},
        "rows": rows,
    }


TRITON_COLUMNS = [
    ("model", "model", "s"),
    ("layer", "layer", "d"),
    ("precision", "precision", "s"),
    ("x (positions, S)", "x", "s"),
    ("w (S, I)", "w", "s"),
    ("target", "target", "s"),
    ("tile", "position_tile", "d"),
    ("chunk", "feature_chunk", "d"),
    ("warps", "num_warps", "d"),
    ("stages", "num_stages", "d"),
    ("grid", "grid", "d"),
    ("under auto", "auto", "s"),
    ("registers", "registers", "d"),
    ("spill stores (B)", "spill_store_bytes", "d"),
    ("spill loads (B)", "spill_load_bytes", "d"),
    ("shared KiB", "shared_memory_kib", ".0f"),
    ("products", "products", "s"),
]
