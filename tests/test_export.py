"""The programs a GPU would run, lowered for CUDA on this CPU-only machine with ``jax.export``.

A host callback, a CPU-only custom call or a CPU-only branch in the steps or the
op fails here: ``jax.export`` refuses custom calls without a compatibility
guarantee, and the CUDA module must hold the accelerator's dot algorithms.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from nmfjax import configuration, cpu_kernel, evaluation, kernels, models, ops, parallel
from nmfjax import trainer as trainer_module
from tests.tiny_configs import tiny_config

CUDA = ("cuda",)
# The fused kernel's Triton call has no compatibility guarantee across jaxlib versions (it is
# compiled where it runs), so jax.export must be told to accept it.
TRITON = [export.DisabledSafetyCheck.custom_call(kernels.TRITON_CALL_TARGET)]
# Likewise the CPU kernel's FFI call: a program that holds it runs where nmfjax registered it.
FUSED = [*TRITON, export.DisabledSafetyCheck.custom_call(cpu_kernel.TARGET)]


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def _module(exported: export.Exported) -> str:
    assert exported.platforms == CUDA
    return exported.mlir_module()


def _custom_call_targets(module: str) -> set[str]:
    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", module)) | set(
        re.findall(r'call_target_name = "([\w$.]+)"', module)
    )


def _while_loops(module: str) -> int:
    return module.count("stablehlo.while")


@pytest.mark.parametrize("kernel", ["xla", "xla_unrolled", "pallas"])
@pytest.mark.parametrize("model", list(models.ARCHITECTURES))
def test_train_and_eval_steps_of_each_network_lower_for_cuda(model, kernel):
    config = tiny_config(model, batch_size=4, eval_batch_size=4, steps_per_call=3)
    config.model.nmf.iterations = 20
    config.model.nmf.kernel = "pallas" if kernel == "pallas" else "xla"
    config.model.nmf.unroll = kernel == "xla_unrolled"
    spec = configuration.validate_config(config)
    trainer = trainer_module.Trainer(config, spec, parallel.data_mesh())
    state = trainer.initial_state
    images = trainer.put_replicated(np.zeros((8, 32, 32, 3), np.uint8))
    labels = trainer.put_replicated(np.zeros((8,), np.int32))
    batch = jax.ShapeDtypeStruct((4,), jnp.int32)
    totals = evaluation.no_metrics(trainer.mesh)
    train = export.export(trainer.train_step, platforms=CUDA, disabled_checks=TRITON)(
        _abstract(state), images, labels, batch, trainer.step_key(0, 0), totals
    )
    evaluate = export.export(trainer.evaluator.step, platforms=CUDA, disabled_checks=TRITON)(
        _abstract(state.params), _abstract(state.batch_stats), images, labels, batch, totals, np.int32(0)
    )
    batches = jax.ShapeDtypeStruct((3, 4), jnp.int32)
    train_calls = export.export(trainer.train_steps, platforms=CUDA, disabled_checks=TRITON)(
        _abstract(state), images, labels, batches, trainer.step_keys(0, range(3)), totals
    )
    nmf_layers = len(spec.features) if spec.uses_nmf else 0
    for exported in (train, evaluate, train_calls):
        module = _module(exported)
        assert "callback" not in module
        if kernel == "pallas" or not nmf_layers:
            # One kernel per NMF layer (the forward h; the backward passes are XLA's), and no loop
            # around the N iterations: the step has no while loop but that of the K steps per call.
            assert _custom_call_targets(module) <= {kernels.TRITON_CALL_TARGET}
            assert module.count(kernels.TRITON_CALL_TARGET) == nmf_layers
            assert _while_loops(module) == (exported is train_calls)
        elif kernel == "xla_unrolled":
            # The N updates as straight-line code: no loop condition for the host to read, so XLA
            # can capture the step in one command buffer. Only the K steps per call loop.
            assert not _custom_call_targets(module)
            assert _while_loops(module) == (exported is train_calls)
        else:
            assert not _custom_call_targets(module)
            assert _while_loops(module) >= nmf_layers
    # The state comes back in the structure it went in (what a GPU run would checkpoint).
    for exported in (train, train_calls):
        assert exported.out_tree == jax.tree.structure((state, totals))
        assert [aval.shape for aval in exported.out_avals] == [leaf.shape for leaf in jax.tree.leaves((state, totals))]


def test_auto_takes_the_kernel_on_a_gpu_where_it_fills_the_sms_and_xla_elsewhere():
    op = jax.jit(lambda x, w: ops.nmf(x, w, kernel="auto"))

    def lowered(positions, platform):
        x = jax.ShapeDtypeStruct((positions, 75), jnp.float32)
        w = jax.ShapeDtypeStruct((75, 32), jnp.float32)
        return export.export(op, platforms=(platform,), disabled_checks=FUSED)(x, w).mlir_module()

    # Block 1 at batch 50: 225 programs for an H100's 132 SMs (planned for an H100 without one).
    assert kernels.TRITON_CALL_TARGET in lowered(28800, "cuda")
    on_cpu = lowered(28800, "cpu")  # the C++ kernel (tests/test_cpu_kernel.py), or XLA's loop of N updates
    assert kernels.TRITON_CALL_TARGET not in on_cpu
    if kernels.cpu_kernel_applies("float32", jnp.float32, "native"):  # (built, with AVX-512)
        assert cpu_kernel.TARGET in on_cpu and _while_loops(on_cpu) == 0
    else:
        assert _while_loops(on_cpu) == 1
    assert cpu_kernel.TARGET not in lowered(28800, "cuda")
    # 64 positions make 4 programs: XLA's loop on the GPU as well ...
    few = lowered(64, "cuda")
    assert kernels.TRITON_CALL_TARGET not in few and _while_loops(few) == 1
    # ... unless the GPU planned for has no more SMs than that.
    with kernels.planning_for(kernels.GpuTarget(capability=90, sm_count=4)):
        assert kernels.TRITON_CALL_TARGET in lowered(64, "cuda")
    assert kernels.TRITON_CALL_TARGET not in lowered(64, "cuda")  # the plan ends with the context


@pytest.mark.parametrize("mode", ops.GRADIENTS)
@pytest.mark.parametrize("precision", ops.PRECISIONS)
def test_the_op_and_its_gradients_lower_for_cuda_in_each_precision(mode, precision):
    def loss(x, w):
        return jnp.sum(ops.nmf(x, w, gradient=mode, precision=precision) ** 2)

    x = jax.ShapeDtypeStruct((64, 75), jnp.float32)
    w = jax.ShapeDtypeStruct((75, 32), jnp.float32)
    module = _module(export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), platforms=CUDA)(x, w))
    assert "callback" not in module and not _custom_call_targets(module)
    # The accelerator's own dot algorithm, not the CPU's emulation (rounding the operands).
    assert ("reduce_precision" in module) is False
    algorithm = {"float32": None, "tf32": "tf32", "bfloat16": "bf16"}[precision]
    if algorithm is None:
        assert "HIGHEST" in module and "algorithm" not in module
    else:
        assert "algorithm" in module and f"lhs_precision_type = {algorithm}" in module
