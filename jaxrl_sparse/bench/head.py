"""The LM head's gemm alone: [B, D] x head -> [B, V] logits, at a preset's real shapes (random weights).

    python -m launch.bench head --models=qwen2.5-1.5b,gpt2-medium --batch=64

Times the decoder's own head (`decoder._head_matmul` + the float32 cast) and equivalent orderings
of the same product, against the bandwidth bound (head weight bytes / measured copy bandwidth):
where a decode step's head time is far above the gemm's time here, the gap is in the step's
fusions, not in the gemm. Every variant's logits are checked equal before timing.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np


def variants(cfg):
    """{name: f(params, h [B, D]) -> float32 logits [B, V]}: the decoder's head and reorderings."""
    from jaxrl_sparse.models.decoder import _head_matmul

    def w_dv(p):   # the head as [D, V] (the untied kernel, or the tied embedding transposed)
        return p["lm_head"]["kernel"] if "lm_head" in p else p["embed"]["embedding"].T

    f32 = jnp.float32
    return {
        "decoder": lambda p, h: _head_matmul(p, cfg, h).astype(f32),
        "f32_accumulate_out": lambda p, h: jnp.dot(h, w_dv(p), preferred_element_type=f32),
        "vocab_major_out": lambda p, h: jnp.dot(w_dv(p).T, h.T, preferred_element_type=f32).T,
        "vocab_split_4": lambda p, h: jnp.concatenate(
            [jnp.dot(h, c, preferred_element_type=f32) for c in jnp.array_split(w_dv(p), 4, axis=1)], 1),
    }


def bench_one(name: str, batch: int, repeats: int, copy_bw: float, dtype: str = "bfloat16",
              seed: int = 0) -> Dict[str, Any]:
    from jaxrl_sparse.bench import common
    from jaxrl_sparse.models.config import preset
    cfg = preset(name, dtype=dtype, param_dtype=dtype)
    dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    kh, kw = jax.random.split(jax.random.key(seed))
    shape = (cfg.vocab_size, cfg.hidden_size) if cfg.tie_embeddings else (cfg.hidden_size, cfg.vocab_size)
    w = (0.02 * jax.random.normal(kw, shape, jnp.float32)).astype(dt)
    params = {"embed": {"embedding": w}} if cfg.tie_embeddings else {"lm_head": {"kernel": w}}
    h = jax.random.normal(kh, (batch, cfg.hidden_size), jnp.float32).astype(dt)
    wbytes = w.size * w.dtype.itemsize
    row = {"model": name, "batch": batch, "dtype": dtype, "device": common.device_info()["device"],
           "bound_ms": wbytes / copy_bw * 1e3}
    ref = None
    for vname, f in variants(cfg).items():
        fn = jax.jit(f)
        out = np.asarray(fn(params, h))
        if ref is None:
            ref = out
        np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * float(np.abs(ref).max()))
        t = common.time_calls(lambda: [fn(params, h) for _ in range(repeats)], repeats=3)["median_s"]
        row[f"{vname}_ms"] = t / repeats * 1e3   # back-to-back calls: a sub-ms kernel, not the host's dispatch
    return row


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m launch.bench head", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen2.5-1.5b,gpt2-medium", help="comma list of preset names")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50, help="back-to-back calls per timing (median of 3)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default=None, help="append one JSON line per model here")
    a = ap.parse_args(argv)
    from jaxrl_sparse.bench import common
    from jaxrl_sparse.errors import UserError
    from jaxrl_sparse.models.config import preset
    if a.batch < 1 or a.repeats < 1:
        raise UserError(f"--batch={a.batch} and --repeats={a.repeats} must be >= 1")
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in names:
        preset(m)   # unknown names fail before any work
    bw = common.copy_bandwidth()
    rows = []
    for m in names:
        row = bench_one(m, a.batch, a.repeats, bw, a.dtype)
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        common.append_jsonl(a.out, row)
    return rows
