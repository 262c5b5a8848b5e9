"""Opt-in persistent XLA compilation cache for the launchers (`--compilation_cache=DIR`).

A run that compiles a program an earlier run compiled (a sweep over flags that keep the shapes, a
resume, a re-run of a preset) loads the executable from DIR instead of compiling it again. JAX keys
each entry on the program, the compile options, the devices and the jax/jaxlib versions, so an
entry is never used for a different program. Entries are written only for compiles that took at
least `min_compile_secs`. With the `filelock` package (a huggingface_hub dependency) JAX keeps
the directory under `max_bytes`, dropping the least recently used entries under a file lock.

Off unless `--compilation_cache=DIR` or `$JAXRL_COMPILATION_CACHE` names a directory. `launch.bench`
never uses it: it reports compile times.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

ENV = "JAXRL_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")


def resolve_dir(path: Optional[str] = None) -> Optional[str]:
    """The directory to use: `path`, else `$JAXRL_COMPILATION_CACHE`; None when off."""
    if path is None:
        path = os.environ.get(ENV, "")
    return None if path.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(path))


def enable(path: Optional[str] = None, min_compile_secs: float = 1.0,
           max_bytes: int = 8 << 30) -> Optional[str]:
    """Turn the cache on at `resolve_dir(path)`; returns the directory, or None when off.

    A directory that cannot be created costs only the cache: one warning line, and the run goes on."""
    d = resolve_dir(path)
    if d is None:
        return None
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache off: cannot create {d} ({e.strerror}); "
              "pass a writable --compilation_cache=DIR", file=sys.stderr)
        return None
    import jax
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    try:   # JAX bounds the directory (an LRU under a file lock) only with the filelock package
        import filelock  # noqa: F401
        jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    except ImportError:
        pass
    return d
