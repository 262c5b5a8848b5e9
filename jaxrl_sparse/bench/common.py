"""Shared benchmark helpers: wall-clock timing of device work, copy bandwidth, memory, reporting.

Timing convention: every timed call ends with `jax.block_until_ready` on its outputs, a warm-up
call (compilation) is excluded, and the median of `repeats` calls is reported.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def device_info() -> Dict[str, Any]:
    """Platform, device kind and count, JAX version, host, and XLA_FLAGS when set (a row's variant)."""
    d = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "")
    return {"platform": d.platform, "device": getattr(d, "device_kind", str(d)),
            "n_devices": jax.device_count(), "jax": jax.__version__, "host": platform.node(),
            **({"xla_flags": flags} if flags else {})}


def timed(fn: Callable[[], Any]) -> Tuple[float, Any]:
    """(seconds, result) of one call, waiting for its device work."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t, out


def time_calls(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Dict[str, Any]:
    """Times `fn()`: first call (compile + run) separately, then the median of `repeats` calls.

    Returns {first_s, median_s, min_s, times, out} (out: the last result).
    """
    first, out = timed(fn)
    for _ in range(max(0, warmup - 1)):
        timed(fn)
    times: List[float] = []
    for _ in range(max(1, repeats)):
        t, out = timed(fn)
        times.append(t)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "times": times, "out": out}


def copy_bandwidth(nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (`y = x + 1` over a big array).

    Default size: 1 GiB on accelerators, 64 MiB on CPU (several times any cache).
    """
    if nbytes is None:
        nbytes = (1 << 30) if jax.devices()[0].platform != "cpu" else (64 << 20)
    n = nbytes // 2
    x = jax.jit(lambda: jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16))()
    f = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    jax.block_until_ready(f(x))
    t = time_calls(lambda: f(x), repeats=repeats)["min_s"]
    return 2 * n * 2 / t


def peak_memory_bytes(device=None) -> Optional[int]:
    """Peak bytes in use on a device since start (None when the backend does not report it)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def tree_digest(tree) -> str:
    """A bit-level fingerprint of a pytree's arrays, computed on their devices: each leaf's bits summed
    as wrapping uint32 (exact, so independent of reduction order), the sums hashed. Equal trees give
    equal digests; a changed bit in any element changes it. Used to check that two compilations of
    the same program (e.g. under different XLA_FLAGS) compute the same state."""
    def bits(x):
        u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        return jnp.sum(u.astype(jnp.uint32), dtype=jnp.uint32)

    sums = np.asarray(jax.device_get([bits(x) for x in jax.tree_util.tree_leaves(tree)]), dtype=np.uint32)
    return hashlib.sha256(sums.tobytes()).hexdigest()[:16]


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str]]) -> str:
    """A markdown table: columns = [(key, header)]; floats with 3 significant decimals."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def append_jsonl(path: Optional[str], record: Dict[str, Any]) -> None:
    """Appends one JSON line (no-op when path is None)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
