"""Shared launcher helpers."""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app

from jaxrl_sparse.errors import UserError


def define_parallel_flags() -> None:
    """--mesh (unless a config field already defines it) and the multi-host flags, defined once."""
    from absl import flags
    F = flags.FLAGS
    if "mesh" not in F:
        flags.DEFINE_string("mesh", "", "device mesh 'data:N,fsdp:M' ('' = all devices on data)")
    if "coordinator_address" in F:
        return
    flags.DEFINE_string("coordinator_address", "", "multi-host: HOST:PORT of process 0 (jax.distributed)")
    flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes (one per host)")
    flags.DEFINE_integer("process_id", -1, "multi-host: this process's index in [0, num_processes)")
    flags.DEFINE_string("distributed", "", "'auto' = let JAX read the cluster (SLURM, Open MPI) from the "
                        "environment; 'off' = never; '' = only with --coordinator_address")


def define_compile_flags() -> None:
    """--compilation_cache (`jaxrl_sparse.compile_cache`) and --deterministic, defined once."""
    from absl import flags
    if "compilation_cache" not in flags.FLAGS:
        flags.DEFINE_string("compilation_cache", None, "directory of a persistent XLA compilation cache: "
                            "re-runs, resumes and sweeps that keep the shapes load compiled programs from it "
                            "instead of compiling again (default $JAXRL_COMPILATION_CACHE, else off)")
    if "deterministic" not in flags.FLAGS:
        flags.DEFINE_bool("deterministic", False, "bit-reproducible runs on GPUs: XLA's deterministic ops "
                          "(no atomic scatter-adds, no gemm autotuning). Same seed, same numbers; slower (H100, "
                          "PPO seed setting: 0.447 vs 0.389 s/iteration). CPU runs are deterministic anyway")


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def use_deterministic_ops() -> None:
    """Add XLA's deterministic-ops flag to XLA_FLAGS; it must precede the backend's start."""
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        raise UserError("--deterministic must be applied before JAX starts its backend; "
                        f"set XLA_FLAGS={DETERMINISTIC_XLA_FLAG} in the environment instead")
    cur = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_XLA_FLAG not in cur.split():
        os.environ["XLA_FLAGS"] = f"{cur} {DETERMINISTIC_XLA_FLAG}".strip()


def run_main(main: Callable) -> None:
    """`absl.app.run(main)`, after `jax.distributed.initialize` when the multi-host flags ask for it,
    with the compilation cache of `--compilation_cache` and XLA's deterministic ops under
    `--deterministic`; a `UserError` prints `error: <msg>` and exits with status 2."""
    define_parallel_flags()
    define_compile_flags()

    def wrapped(argv):
        from absl import flags, logging
        F = flags.FLAGS
        if not F["verbosity"].present:  # Orbax logs every file it writes at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            if F.deterministic:
                use_deterministic_ops()
            from jaxrl_sparse import compile_cache
            compile_cache.enable(F.compilation_cache)
            from jaxrl_sparse.parallel import init_distributed, parse_mesh
            init_distributed(F.coordinator_address, F.num_processes, F.process_id, F.distributed)
            parse_mesh(F.mesh)  # a bad --mesh fails before any model is loaded
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)


def _field_comments(cls) -> dict:
    """`name: type = default  # comment` -> {name: comment}, read from the dataclass source."""
    import inspect
    import re
    out = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:\s*[^=]+=\s*.*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def define_flags_from_config(cls, *, defaults: dict | None = None, skip: tuple = ()) -> None:
    """One absl flag per field of the frozen config dataclass `cls` (help = the field's comment).

    Keeps launchers thin: the dataclass is the single list of knobs, the flags mirror it.
    """
    import dataclasses

    from absl import flags
    helps = _field_comments(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        help_ = helps.get(f.name, f.name)
        if f.type in (bool, "bool"):
            flags.DEFINE_bool(f.name, default, help_)
        elif f.type in (int, "int"):
            flags.DEFINE_integer(f.name, default, help_)
        elif f.type in (float, "float"):
            flags.DEFINE_float(f.name, default, help_)
        else:
            flags.DEFINE_string(f.name, default, help_)


def config_from_flags(cls, **extra):
    """Builds `cls` from the parsed absl flags of the same names."""
    import dataclasses

    from absl import flags
    F = flags.FLAGS
    kw = {f.name: F[f.name].value for f in dataclasses.fields(cls) if f.name in F}
    kw.update(extra)
    return cls(**kw)
