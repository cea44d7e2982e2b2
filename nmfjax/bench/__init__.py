"""Benchmarks: throughput of the paper's networks, the paper's Figure 1, and how cost grows.

    python -m nmfjax.bench --output bench            # the full suite (minutes on 2 CPU cores)
    python -m nmfjax.bench --tiny --output /tmp/b     # about a minute: keeps the code working

Every figure is the median over ``--repeats`` timed calls after one warm-up
call; compile time is reported apart. Prints tables and writes
``OUTPUT/bench.json`` and ``OUTPUT/bench.png``.

* ``throughput``: per model and batch size, train-step images/s (the real
  jitted step: gather, augmentation, forward, backward, Adam) and eval images/s;
  achieved GFLOP/s from XLA's cost analysis and its fraction of the machine's
  float32 peak, measured first in the same run (2048 x 2048 products on the
  same devices, :mod:`nmfjax.bench.peak`); peak memory of the compiled step
  (arguments + outputs + temporaries).
* ``loop``: ``train.py``'s own epoch (``Trainer.train_epoch``, ``evaluate``)
  next to the bare train and eval steps on the same trainer: the ratio is what
  the loop adds.
* ``figure1``: the paper's Figure 1: backward time and memory of the CNN,
  and of the CNMF network with the "unrolled", "approx" and "implicit"
  backward, relative to the CNN, at N in {5, 20, 50}.
* ``scaling``: train-step time of CNMF+1x1 against N and against batch size.

More suites, each its own JSON::

    python -m nmfjax.bench --profile --output bench     # where a CNMF+1x1 train step's time goes (CPU)

    python -m nmfjax.bench --precision --output bench   # the op in tf32 and bfloat16 against float32
    python -m nmfjax.bench --bfloat16 --output bench    # CNMF+1x1 at bfloat16 against float32 (CPU)
    python -m nmfjax.bench --cpu_kernel --output bench  # the fused C++ kernel against XLA's loop (CPU)
    python -m nmfjax.bench --unroll --output bench      # the NMF loop unrolled: compile time and speed
    python -m nmfjax.bench --triton --output bench      # the fused kernel compiled for sm_90/sm_80 (no GPU)
    python -m nmfjax.bench --gpu --data_dir DIR --output bench   # on a machine with a GPU: its table

* ``--profile`` (``profile-cpu.json``): a trace of CNMF+1x1's train step at
  batch 50: the time of each XLA operation per device and step, split into the
  NMF op's forward iterations and the rest, with the rest's 15 largest.
* ``--unroll`` (``unroll.json``): each NMF network at batch 50 with XLA's
  while loop of the N updates and with it unrolled (``NMFOptions.unroll``):
  compile seconds and train and eval images/s.
* ``--triton`` (``triton.json``): :mod:`nmfjax.bench.triton`, each NMF
  layer's fused kernel compiled by pip's ``triton`` for sm_90 and sm_80:
  grid, registers, spills, shared memory and the products' instructions.
* ``--precision`` (``precision.json``): the relative error of ``h`` and of the
  input and weight gradients of each backward mode when every product of the
  op runs in TF32 or bfloat16 instead of float32, at N in {5, 20, 50}, on a
  first-block-sized problem. On a CPU tf32 is emulated (operands rounded to
  its mantissa, float32 sums) and bfloat16 runs as :func:`nmfjax.ops.cpu_bfloat16_path`
  says (see :func:`nmfjax.ops.matmul`).
* ``--bfloat16`` (``bfloat16.json``): :mod:`nmfjax.bench.bfloat16`, the
  float32 and bfloat16 product peaks, and CNMF+1x1's train and eval steps and
  ``train.py``'s epoch at float32, native and emulated bfloat16, each as a
  fraction of its own peak, with a profile of the step at each precision.
* ``--cpu_kernel`` (``cpu_kernel.json``): :mod:`nmfjax.bench.fused_cpu`, each NMF
  layer of CNMF+1x1 alone with XLA's loop and with :mod:`nmfjax.cpu_kernel`, and
  CNMF+1x1's train and eval steps and ``train.py``'s epoch with each, as fractions
  of the float32 peak, the two kernels in turn in each of 4 rounds.
* ``--gpu`` (``gpu.json``): the op's results on the GPU against the CPU's
  (float32, and TF32 and bfloat16 on the GPU's own tensor cores), train and
  eval images/s of the four networks at batch 50 and 500 (CNMF+1x1 in each
  precision), the NMF networks with XLA's loop (``kernel="xla"``), with that
  loop unrolled (``"xla_unrolled"``, ``NMFOptions.unroll``) and with the
  fused kernel (``"pallas"``, :mod:`nmfjax.kernels`); a profile of CNMF+1x1's
  train step at batch 50 with each (:mod:`nmfjax.bench.profile`: fusions,
  custom calls and while loops of the program, device kernels per step and
  their time from a trace); and a short ``train.py`` run on ``--data_dir``
  with each, with the paper's recipe (500 epochs of all CIFAR-10) projected
  from its last epoch's train and test speed. Without a GPU it stops with an
  error (exit status 2).
"""

from nmfjax.bench.cli import main, run
from nmfjax.bench.figure1 import FIGURE1_COLUMNS, figure1, measure_backward
from nmfjax.bench.fused_cpu import CPU_KERNEL_COLUMNS, LAYER_COLUMNS, cpu_kernel_study, measure_layers
from nmfjax.bench.gpu import GPU_FULL, GPU_THROUGHPUT_COLUMNS, GPU_TINY, GPUSizes, gpu_suite, paper_recipe_minutes
from nmfjax.bench.loop import LOOP_COLUMNS, compare_in_rounds, measure_loop
from nmfjax.bench.peak import PEAK_SIZE, measure_peak_gflops
from nmfjax.bench.precision import PRECISION_COLUMNS, PRECISION_ITERATIONS, op_errors, op_problem, precision_study
from nmfjax.bench.profile import (
    CPU_PROFILE_COLUMNS,
    PROFILE_COLUMNS,
    TOP_REST_COLUMNS,
    cpu_profile,
    nmf_loop_instructions,
    profile_step,
    program_counts,
)
from nmfjax.bench.throughput import (
    FULL,
    NMF_VARIANTS,
    SCALING_COLUMNS,
    THROUGHPUT_COLUMNS,
    TINY,
    UNROLL_COLUMNS,
    Sizes,
    measure_train_and_eval,
    nmf_variant,
    scaling,
    unroll_study,
)
from nmfjax.bench.timing import uncounted_loop_flops

__all__ = [
    "CPU_KERNEL_COLUMNS",
    "LAYER_COLUMNS",
    "compare_in_rounds",
    "cpu_kernel_study",
    "measure_layers",
    "CPU_PROFILE_COLUMNS",
    "FIGURE1_COLUMNS",
    "FULL",
    "GPU_FULL",
    "GPU_THROUGHPUT_COLUMNS",
    "GPU_TINY",
    "LOOP_COLUMNS",
    "NMF_VARIANTS",
    "PEAK_SIZE",
    "PRECISION_COLUMNS",
    "PRECISION_ITERATIONS",
    "PROFILE_COLUMNS",
    "SCALING_COLUMNS",
    "THROUGHPUT_COLUMNS",
    "TOP_REST_COLUMNS",
    "TINY",
    "UNROLL_COLUMNS",
    "GPUSizes",
    "Sizes",
    "cpu_profile",
    "figure1",
    "gpu_suite",
    "main",
    "measure_backward",
    "measure_loop",
    "measure_peak_gflops",
    "measure_train_and_eval",
    "nmf_loop_instructions",
    "nmf_variant",
    "op_errors",
    "op_problem",
    "paper_recipe_minutes",
    "precision_study",
    "profile_step",
    "program_counts",
    "run",
    "scaling",
    "uncounted_loop_flops",
    "unroll_study",
]
