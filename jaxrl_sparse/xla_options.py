"""XLA compile options the PPO update and score programs are jitted with
(`jax.jit(..., compiler_options=...)`).

On a GPU, XLA records a program's straight-line kernels into CUDA graphs (command buffers). In
its default scheduling mode (LHS) each kernel in a graph waits for the one before it; in CONCURRENT
mode a kernel waits only for the kernels whose buffers it reads or overwrites, so independent kernels
overlap. A PPO mini-batch step is full of such kernels: the fused weight-gradient + Adam kernel of
layer l has nothing to do with the backward pass still running through layers below it. Measured
on an H100 (`python -m launch.bench ppo --settings=seed`, BENCHMARKS.md, session 15): the update
0.206 → 0.197–0.200 s, the state after the run bit-identical under `--xla_gpu_deterministic_ops`.
The sampler keeps the default mode: its decode loop gained 3 ms at batch 16 and lost 6 ms at 128.

Only single-device programs get it: the multi-GPU programs' collectives were measured under the
default mode only. A mode set in `XLA_FLAGS` (e.g. `--xla_gpu_command_buffer_scheduling_mode=LHS`
for an A/B) wins over this one. Off the GPU the option is read by nothing.
"""
from __future__ import annotations

import os
from typing import Dict

SCHEDULING_MODE = "xla_gpu_command_buffer_scheduling_mode"


def concurrent_kernels(mesh=None) -> Dict[str, str]:
    """`compiler_options` for a jit whose program runs on one device (mesh None or of size 1): the
    CONCURRENT command-buffer mode, unless `XLA_FLAGS` names a mode itself; {} otherwise."""
    if mesh is not None and mesh.size > 1:
        return {}
    if SCHEDULING_MODE in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {SCHEDULING_MODE: "CONCURRENT"}
