"""The sampler's step alone (`sampling.sample_tokens`: top-k / top-p / draw) by top-k slice width.

    python -m launch.bench sampler --shapes=16x50257,128x50257,64x49152,64x151936 --top_k=50 --top_p=0.95

Random logits [B, V]; each width in --chunks runs 200 sampling steps inside one jitted loop (so
dispatch is not timed), best of 5; µs per step. 'auto' is `sampling.top_k_chunk(V, k)`, what the
sampler uses; 0 is one `lax.top_k` over the vocabulary. Every width gives the same tokens.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np


def step_time_us(B: int, V: int, chunk: Optional[int], top_k: int, top_p: float, steps: int = 200,
                 repeats: int = 5) -> Dict[str, Any]:
    """µs per sampling step at [B, V] with top-k slice width `chunk` (None = the sampler's default)."""
    from jaxrl_sparse import sampling
    x = jax.random.normal(jax.random.key(0), (B, V)) * 3
    keys = jax.random.split(jax.random.key(1), B)
    old, sampling.TOP_K_CHUNK = sampling.TOP_K_CHUNK, chunk
    try:
        def body(i, c):  # the carried sum feeds the next step, so steps cannot be hoisted or merged
            tok, lp, _ = sampling.sample_tokens(x + c[0] * 1e-9, keys, greedy=False,
                                                temperature=1.0, top_k=top_k, top_p=top_p)
            return c[0] + tok[0].astype(jnp.float32), c[1] + lp, tok
        f = jax.jit(lambda: jax.lax.fori_loop(0, steps, body, (jnp.float32(0), jnp.zeros(B), jnp.zeros(B, jnp.int32))))
        last = jax.block_until_ready(f())[2]
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(f())
            ts.append(time.perf_counter() - t)
    finally:
        sampling.TOP_K_CHUNK = old
    return {"us_per_step": 1e6 * min(ts) / steps, "tokens": np.asarray(last)}


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    from absl import flags as _f
    from jaxrl_sparse import sampling
    from jaxrl_sparse.bench.common import append_jsonl, device_info
    from jaxrl_sparse.errors import UserError
    fv = _f.FlagValues()
    _f.DEFINE_list("shapes", ["16x50257", "128x50257", "64x49152", "64x151936"], "BxV logits shapes", flag_values=fv)
    _f.DEFINE_list("chunks", ["0", "8", "16", "32", "64", "128", "256", "auto"], "top-k slice widths", flag_values=fv)
    _f.DEFINE_integer("top_k", 50, "top-k", flag_values=fv)
    _f.DEFINE_float("top_p", 0.95, "top-p", flag_values=fv)
    _f.DEFINE_integer("steps", 200, "sampling steps per timed loop", flag_values=fv)
    _f.DEFINE_string("out", "", "append JSON lines here", flag_values=fv)
    fv(["bench sampler"] + list(argv or []))
    rows = []
    for shape in fv.shapes:
        try:
            B, V = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise UserError(f"--shapes: {shape!r} is not BxV (e.g. 16x50257)") from None
        times, ref = {}, None
        for c in fv.chunks:
            chunk = None if c == "auto" else int(c)
            r = step_time_us(B, V, chunk, fv.top_k, fv.top_p, fv.steps)
            if ref is None:
                ref = r["tokens"]
            elif not np.array_equal(ref, r["tokens"]):
                raise AssertionError(f"top-k width {c} sampled other tokens at {shape}")
            times[c] = r["us_per_step"]
        row = {"bench": "sampler", "batch": B, "vocab": V, "top_k": fv.top_k, "top_p": fv.top_p,
               "auto_chunk": sampling.top_k_chunk(V, fv.top_k), "us_per_step": times, **device_info()}
        print(f"B{B} V{V} (auto = {row['auto_chunk']}): " + "  ".join(f"{c}: {t:.1f}" for c, t in times.items())
              + " µs per step")
        rows.append(row)
        append_jsonl(fv.out or None, row)
    return rows
