"""The compiled K-step call keeps what the single train step has: the same products, the batch split
over the devices, the state donated, and the resident images read where they are (no copy).

No speed is timed here: the scan that runs ``config.steps_per_call`` steps once made CNMF+1x1 1.5x
slower on a CPU because XLA compiled a 1x1 convolution's gradient inside it into a generic
convolution; that shows as products that differ between the two programs.
"""

import collections
import json
import re
import sys
import textwrap

import pytest

from tests.conftest import once_per_run, run_process

_PROGRAMS_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"  # after the suite's flags
    import jax, jax.numpy as jnp, numpy as np
    from nmfjax import configuration, cpu_kernel, evaluation, parallel, trainer as trainers
    from tests.tiny_configs import tiny_config

    # "auto" as on a processor with AVX-512, where it takes the C++ kernel (the same programs on any).
    cpu_kernel.vector_bits = lambda: 512
    config = tiny_config({model!r}, batch_size=12, eval_batch_size=12)
    spec = configuration.validate_config(config)
    trainer = trainers.Trainer(config, spec, parallel.data_mesh())
    images = trainer.put_replicated(np.zeros((36, 32, 32, 3), np.uint8))
    labels = trainer.put_replicated(np.zeros((36,), np.int32))
    state, totals = trainer.initial_state, evaluation.no_metrics(trainer.mesh)
    single = trainer.train_step.lower(
        state, images, labels, jax.ShapeDtypeStruct((12,), jnp.int32), trainer.step_key(0, 0), totals
    )
    steps = trainer.train_steps.lower(
        state, images, labels, jax.ShapeDtypeStruct((3, 12), jnp.int32), trainer.step_keys(0, range(3)), totals
    )
    print(json.dumps({{
        "devices": jax.device_count(),
        "cpu_kernel": cpu_kernel.available() and spec.uses_nmf,
        "state_leaves": len(jax.tree.leaves(state)),
        "single": single.compile().as_text(),
        "steps": steps.compile().as_text(),
    }}))
    """
)

# "%name = SHAPE opcode(operands), attributes": the products, with their shapes and dimension labels.
_PRODUCT = re.compile(r"=\s*(\S+)\s+(dot|convolution)\((.*)")
_ATTRIBUTES = re.compile(r"(window=\{[^}]*\}|dim_labels=\S+|\w+_contracting_dims=\{[^}]*\}|\w+_batch_dims=\{[^}]*\})")


def _products(hlo: str) -> collections.Counter:
    products = collections.Counter()
    for line in hlo.splitlines():
        if match := _PRODUCT.search(line):
            shape, opcode, rest = match.groups()
            products[(opcode, re.sub(r"\{[\d,]*\}$", "", shape), *_ATTRIBUTES.findall(rest))] += 1
    return products


def _aliased_parameters(hlo: str) -> set[int]:
    header = hlo.splitlines()[0]
    return {int(number) for number in re.findall(r"\{[\d,]*\}: \((\d+), \{[\d,]*\}, may-alias\)", header)}


@pytest.fixture(scope="module", params=["cnmf_1x1", "cnn_1x1"])
def programs(request, tmp_path_factory):
    def compile_programs():
        script = _PROGRAMS_SCRIPT.format(model=request.param)
        child = run_process([sys.executable, "-c", script], tmp_path_factory.mktemp("programs"), timeout=600)
        assert child.process.returncode == 0, child.stderr[-3000:]
        return json.loads(child.stdout.strip().splitlines()[-1])

    return once_per_run(tmp_path_factory, f"programs-{request.param}", compile_programs)


def test_the_k_step_call_runs_the_products_of_the_single_step(programs):
    single, steps = _products(programs["single"]), _products(programs["steps"])
    assert single, "no product found: the HLO text's format has changed"
    assert steps == single, f"only in the K-step call: {steps - single}; only in the single step: {single - steps}"


def test_the_k_step_call_splits_the_batch_over_the_devices(programs):
    assert programs["devices"] == 2
    for name in ("single", "steps"):
        hlo = programs[name]
        # The first NMF or convolution layer's patches: 24 x 24 positions of 6 images per device, not 12.
        assert "f32[3456,75]" in hlo, name
        assert "f32[6912,75]" not in hlo, name
        assert "all-reduce(" in hlo, name
        # Where the C++ kernel runs the NMF iterations (kernel "auto" on a CPU), each device's call takes
        # its own positions: custom_partitioning keeps the split instead of gathering the batch.
        calls = [line for line in hlo.splitlines() if 'custom_call_target="nmfjax_nmf_forward"' in line]
        if programs["cpu_kernel"]:
            results = {line.split("=")[1].split()[0].split("{")[0] for line in calls}
            assert "f32[3456,32]" in results and "f32[6912,32]" not in results, (name, results)
        else:
            assert not calls


def test_the_k_step_call_donates_the_state(programs):
    state = set(range(programs["state_leaves"]))
    for name in ("single", "steps"):
        assert state <= _aliased_parameters(programs[name]), name


def test_the_k_step_call_reads_the_resident_images_without_copying_them(programs):
    for name in ("single", "steps"):
        copies = re.findall(r"=\s*u8\[36,32,32,3\]\{[\d,]*\}\s+copy\(", programs[name])
        assert not copies, name
        assert "u8[36,32,32,3]" in programs[name]  # (the images are there, uncopied)
