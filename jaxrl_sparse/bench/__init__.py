"""Benchmarks run by `python -m launch.bench <name>`; shared helpers live in `bench.common`.

Each entry of COMMANDS is a `module:function` taking the remaining argv (a list of strings),
imported only when chosen, so one benchmark's dependencies never slow or break another.
"""
from __future__ import annotations

import importlib
from typing import List

from jaxrl_sparse.errors import UserError

COMMANDS = {
    "generate": "jaxrl_sparse.bench.generate:main",         # sampler throughput vs transformers
    "analyze": "jaxrl_sparse.analysis.bench_analyze:main",  # sparse-delta / rank analysis
    "ppo": "jaxrl_sparse.bench.ppo:main",                   # PPO iteration per phase vs TRL 0.8.6
    "es": "jaxrl_sparse.bench.es:main",                     # ES iteration: NP / low-rank WP / full-rank WP
    "grpo": "jaxrl_sparse.bench.grpo:main",                 # GRPO+LoRA rollout tok/s (vs HF), update MFU
    "head": "jaxrl_sparse.bench.head:main",                 # the LM head's gemm alone vs its bandwidth bound
    "sampler": "jaxrl_sparse.bench.sampler:main",           # the sampler's step alone by top-k slice width
    "gemm": "jaxrl_sparse.bench.gemm:main",                 # the PPO update's gemms alone, split-K / batched dW
    "attention": "jaxrl_sparse.bench.attention:main",       # decode / training attention kernels vs XLA (GPU)
    "profile": "jaxrl_sparse.bench.profile:main",           # any of the above under the JAX profiler
}


def dispatch(argv: List[str]):
    """Runs COMMANDS[argv[0]] with argv[1:]."""
    if not argv or argv[0] in ("-h", "--help"):
        raise UserError(f"usage: python -m launch.bench {{{','.join(COMMANDS)}}} [--flags] "
                        "(add --help after the name for its flags)")
    name = argv[0]
    if name not in COMMANDS:
        raise UserError(f"unknown benchmark {name!r}; choose one of: {', '.join(COMMANDS)}")
    module, fn = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), fn)(argv[1:])
