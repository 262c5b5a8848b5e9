"""`python -m launch.bench attention`: the two attention kernels alone against XLA's path.

- decode: one decode step's attention + KV-cache write (`kernels.decode_attention` vs
  `decoder._cache_write_attention`: two cache writes and XLA's attention), caches carried (donated)
  from call to call as in a decode loop;
- train: a whole-sequence causal attention's forward and backward (`jax.grad` of
  `kernels.train_attention.pallas_attention` vs of `decoder._bthd_attention`), as the PPO update runs it.
Random inputs at real models' shapes (`config.preset`), left padding in row 0. Time per call is the
device's kernel time (`gemm.call_time_us`). max_err: the kernel's largest |difference| from XLA's path
computed at fp32 ("highest") precision (outputs; for train, gradients relative to their largest
entry), on the rows that see a key. The kernels need a CUDA GPU; elsewhere the command stops with a
message.

    python -m launch.bench attention
    python -m launch.bench attention --parts=train --reps=50
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.bench.common import append_jsonl, device_info, markdown_table
from jaxrl_sparse.bench.gemm import call_time_us

# (model, batch, cache slots, new token's slot, dtype): PPO's seed rollout, SmolLM2 / qwen generation
DECODE_SHAPES = [("gpt2-medium", 16, 81, 50, "float32"), ("gpt2-medium", 16, 81, 80, "float32"),
                 ("smollm2-135m", 64, 200, 150, "float32"), ("qwen2.5-1.5b", 64, 200, 7, "bfloat16")]
# (model, batch, tokens): one PPO mini-batch at the seed's setting
TRAIN_SHAPES = [("gpt2-medium", 4, 80), ("smollm2-135m", 4, 80)]
PAD = 6  # row 0's left padding


def _swap(f):
    """(o, k_cache, v_cache) -> (k_cache, v_cache, o): the carried caches first (`call_time_us`)."""
    return lambda *a: (lambda r: (r[1], r[2], r[0]))(f(*a))


def run_decode(reps: int) -> List[Dict[str, Any]]:
    from jaxrl_sparse.kernels import decode_attention as da
    from jaxrl_sparse.models import decoder
    from jaxrl_sparse.models.config import preset
    out = []
    for name, B, S, idx, dt in DECODE_SHAPES:
        cfg, dt = preset(name), jnp.dtype(dt)
        H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        ks = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(ks[0], (B, 1, H, hd), dt)
        kn, vn = (jax.random.normal(k, (B, K, 1, hd), dt) for k in ks[1:3])
        kc, vc = (jax.random.normal(k, (B, K, S, hd), dt) for k in ks[3:5])
        vis = np.zeros((B, 1, S), bool)
        vis[:, :, :idx + 1] = True
        vis[0, :, :min(PAD, idx)] = False
        args = (q, kn, vn, kc, vc, jnp.asarray(vis), jnp.int32(idx))
        fresh = lambda: tuple(jnp.array(a, copy=True) for a in args)  # donated copies
        xla = functools.partial(decoder._cache_write_attention, cfg)
        kern = functools.partial(da.pallas_decode_attention, scale=cfg.attn_scale)
        with jax.default_matmul_precision("highest"):
            want = jax.jit(xla)(*args)
        got = jax.jit(kern)(*fresh())
        err = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0].astype(jnp.float32))))
        same = all(bool(jnp.array_equal(g, w)) for g, w in zip(got[1:], want[1:]))
        xla_us, how = call_time_us(_swap(xla), *fresh(), reps=reps, carry=(3, 4))
        k_us, _ = call_time_us(_swap(kern), *fresh(), reps=reps, carry=(3, 4))
        out.append({"part": "decode", "model": name, "shape": f"B{B} S{S} slot {idx} {dt.name}",
                    "xla_us": xla_us, "kernel_us": k_us, "max_err": err, "caches_equal": same, "timing": how})
    return out


def run_train(reps: int) -> List[Dict[str, Any]]:
    from jaxrl_sparse.kernels import train_attention as ta
    from jaxrl_sparse.models import decoder
    from jaxrl_sparse.models.config import preset
    out = []
    for name, B, T in TRAIN_SHAPES:
        cfg = preset(name)
        H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (B, T, H, hd))
        k, v = jax.random.normal(ks[1], (B, T, K, hd)), jax.random.normal(ks[2], (B, T, K, hd))
        cot = jax.random.normal(ks[3], (B, T, H, hd))
        kv = np.ones((B, T), bool)
        kv[0, :PAD] = False
        mask = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & kv[:, None, :])
        seen = jnp.asarray(kv)[:, :, None, None]  # query t sees a key iff slot t is real (causal)
        xla = lambda q, k, v: jnp.sum(jnp.where(seen, decoder._bthd_attention(cfg, q, k, v, mask), 0.0) * cot)
        ker = lambda q, k, v: jnp.sum(ta.pallas_attention(q, k, v, mask.astype(jnp.int8), cfg.attn_scale) * cot)
        grads = lambda f: jax.grad(f, argnums=(0, 1, 2))
        with jax.default_matmul_precision("highest"):
            want = jax.jit(grads(xla))(q, k, v)
        got = jax.jit(grads(ker))(q, k, v)
        err = max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got, want))
        xla_us, how = call_time_us(grads(xla), q, k, v, reps=reps)
        k_us, _ = call_time_us(grads(ker), q, k, v, reps=reps)
        out.append({"part": "train (fwd+bwd)", "model": name, "shape": f"B{B} T{T} float32",
                    "xla_us": xla_us, "kernel_us": k_us, "max_err": err, "caches_equal": None, "timing": how})
    return out


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    from absl import flags as _f
    from jaxrl_sparse.errors import UserError
    fv = _f.FlagValues()
    _f.DEFINE_list("parts", ["decode", "train"], "decode: one step's attention + cache write; train: a "
                   "sequence's attention forward and backward", flag_values=fv)
    _f.DEFINE_integer("reps", 30, "calls per timing", flag_values=fv)
    _f.DEFINE_string("out", "", "append JSON lines here", flag_values=fv)
    fv(["bench attention"] + list(argv or []))
    for p in fv.parts:
        if p not in ("decode", "train"):
            raise UserError(f"--parts: unknown {p!r}; choose decode, train")
    if jax.default_backend() != "gpu":
        raise UserError("launch.bench attention times Pallas (Triton) kernels: run it on a CUDA GPU "
                        "(the CPU tests run them in the Pallas interpreter)")
    rows = (run_decode(fv.reps) if "decode" in fv.parts else []) + (run_train(fv.reps) if "train" in fv.parts else [])
    info = device_info()
    for r in rows:
        append_jsonl(fv.out or None, {"bench": "attention", **r, **info})
    print(markdown_table(rows, [("part", "part"), ("model", "model"), ("shape", "shape"), ("xla_us", "XLA µs"),
                                ("kernel_us", "kernel µs"), ("max_err", "max err vs fp32"),
                                ("caches_equal", "caches equal"), ("timing", "timing")]))
    print(f"device: {info['device']}")
    return rows
