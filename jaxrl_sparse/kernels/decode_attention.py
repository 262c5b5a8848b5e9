"""Single-token (decode) attention and the KV-cache write as one kernel.

A decode step of a layer otherwise runs three kernels: two cache writes (`dynamic_update_slice` of
the new key and value) and XLA's attention fusion, which reads every slot of the cache whatever the
step. Here one Pallas (Triton) program per (row, query head):
  - scores the new token from registers and the cache's earlier slots [0, index) block by block
    (an online softmax), so slots after the current one are never read;
  - writes the new key and value into slot `index` of the caches, which are updated in place
    (the program of the first query head of each kv head writes them).
Products run in float32 on the vector units (one query row per program, so no tensor-core tile
applies), a little more exact than XLA's TF32 dot. Grouped-query attention: query head h reads kv
head h // (H / K).

`decode_attention_qkv` takes the joined q/k/v projection's output as it lies ([B, 1, (H + 2K) hd])
and its bias: each program reads its head's slices and adds the bias itself, where XLA would run one
bias-add kernel per part before the attention (the fused decode step, `decoder._fused_decode_forward`).

`decode_attention` picks the kernel when lowered for CUDA and the caller's XLA path elsewhere
(`lax.platform_dependent`), so one traced program serves GPUs and the CPU tests; interpret=True runs
the kernel through the Pallas interpreter (tests).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

NEG = -1e30


def block_slots(slots: int, pref: int = 32) -> int:
    """Cache slots scored per loop step: the largest power of two <= min(pref, slots)."""
    b = 1
    while b * 2 <= min(pref, slots):
        b *= 2
    return b


def supported(head_dim: int, slots: int) -> bool:
    """Shapes the kernel takes: a power-of-two head size (Triton block shapes) and >= 8 slots."""
    return head_dim >= 8 and head_dim & (head_dim - 1) == 0 and slots >= 8


def _kernel(*refs, group: int, bs: int, slots: int, scale: float, joined: bool, has_bias: bool, hd: int,
            heads: int):
    from jax.experimental import pallas as pl
    if joined:  # qkv [B, 1, (H + 2K) hd] (+ bias [(H + 2K) hd]): the projection's output as it lies
        idx_ref, qkv_ref, *rest = refs
        b_ref = rest.pop(0) if has_bias else None
    else:
        idx_ref, q_ref, kn_ref, vn_ref, *rest = refs
    kc_ref, vc_ref, m_ref, o_ref, ko_ref, vo_ref = rest
    b, h = pl.program_id(0), pl.program_id(1)
    kh = h // group
    idx = idx_ref[0]
    f32 = jnp.float32
    if joined:
        H, K = heads, heads // group

        def part(off):  # the biased projection, rounded to its dtype as the XLA path's add is
            v = qkv_ref[b, 0, pl.ds(off, hd)]
            return v + b_ref[pl.ds(off, hd)].astype(v.dtype) if has_bias else v

        q_in, kn_in, vn_in = part(h * hd), part((H + kh) * hd), part((H + K + kh) * hd)
    else:
        q_in, kn_in, vn_in = q_ref[b, 0, h, :], kn_ref[b, kh, 0, :], vn_ref[b, kh, 0, :]
    q, kn, vn = q_in.astype(f32), kn_in.astype(f32), vn_in.astype(f32)  # [hd]
    new_ok = jnp.max(m_ref[b, pl.ds(idx, 1)].astype(f32))   # 1.0: the new slot is visible
    s_new = jnp.sum(q * kn) * scale
    m0 = jnp.where(new_ok > 0, s_new, NEG)
    l0 = new_ok
    acc0 = vn * new_ok

    def body(j, carry):
        m_i, l_i, acc = carry
        lo = j * bs
        start = jnp.minimum(lo, slots - bs)  # the last block shifts back inside the cache
        pos = start + jnp.arange(bs)
        keys = kc_ref[b, kh, pl.ds(start, bs), :].astype(f32)    # [bs, hd]
        vals = vc_ref[b, kh, pl.ds(start, bs), :].astype(f32)
        vis = m_ref[b, pl.ds(start, bs)]
        ok = (pos >= lo) & (pos < idx) & (vis != 0)             # earlier slots, each counted once
        s = jnp.where(ok, jnp.sum(keys * q[None, :], axis=1) * scale, NEG)
        m_new = jnp.maximum(m_i, jnp.max(s))
        alpha = jnp.exp(m_i - m_new)
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        return m_new, l_i * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * vals, axis=0)

    n_blocks = (idx + bs - 1) // bs
    _, l_f, acc_f = jax.lax.fori_loop(0, n_blocks, body, (m0, l0, acc0))
    out = jnp.where(l_f > 0, acc_f / jnp.maximum(l_f, 1e-30), 0.0).astype(o_ref.dtype)
    if joined:
        o_ref[b, 0, pl.ds(h * hd, hd)] = out
    else:
        o_ref[b, 0, h, :] = out

    @pl.when(h % group == 0)
    def _():
        ko_ref[b, kh, pl.ds(idx, 1), :] = kn_in[None, :].astype(ko_ref.dtype)
        vo_ref[b, kh, pl.ds(idx, 1), :] = vn_in[None, :].astype(vo_ref.dtype)


def _call(args, out_shape, k_cache, v_cache, grid, *, joined: bool, has_bias: bool, hd: int, group: int,
          scale: float, block: int, num_warps: int, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    S = k_cache.shape[2]
    kern = functools.partial(_kernel, group=group, bs=block_slots(S, block), slots=S, scale=float(scale),
                             joined=joined, has_bias=has_bias, hd=hd, heads=grid[1])
    whole = pl.no_block_spec
    n = len(args)
    return pl.pallas_call(
        kern, grid=grid, in_specs=[whole] * n, out_specs=(whole, whole, whole),
        out_shape=(out_shape, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={n - 3: 1, n - 2: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="decode_attention")(*args)


def pallas_decode_attention(q, k_new, v_new, k_cache, v_cache, mask, index, *, scale: float,
                            block: int = 32, num_warps: int = 4, interpret: bool = False):
    """q [B, 1, H, hd], k_new / v_new [B, K, 1, hd], caches [B, K, S, hd], mask [B, 1, S] (slot
    visible to the query, the new slot included), index [] int32 (the new token's slot).

    Returns (o [B, 1, H, hd] in q's dtype, k_cache, v_cache with the new token at `index`)."""
    B, _, H, hd = q.shape
    K = k_cache.shape[1]
    args = (jnp.reshape(index, (1,)).astype(jnp.int32), q, k_new, v_new, k_cache, v_cache,
            mask[:, 0].astype(jnp.int8))
    return _call(args, jax.ShapeDtypeStruct(q.shape, q.dtype), k_cache, v_cache, (B, H), joined=False,
                 has_bias=False, hd=hd, group=H // K, scale=scale, block=block, num_warps=num_warps,
                 interpret=interpret)


def pallas_decode_attention_qkv(qkv, bias, k_cache, v_cache, mask, index, *, heads: int, scale: float,
                                block: int = 32, num_warps: int = 4, interpret: bool = False):
    """`pallas_decode_attention` on a joined projection's output: qkv [B, 1, (H + 2K) hd] (q heads,
    then k, then v), bias [(H + 2K) hd] or None, added in the kernel (the XLA path runs one add
    kernel per part). Returns (o [B, 1, H hd] in qkv's dtype, k_cache, v_cache)."""
    B = qkv.shape[0]
    K, hd = k_cache.shape[1], k_cache.shape[3]
    args = (jnp.reshape(index, (1,)).astype(jnp.int32), qkv) + ((bias,) if bias is not None else ()) + (
        k_cache, v_cache, mask[:, 0].astype(jnp.int8))
    out = jax.ShapeDtypeStruct((B, 1, heads * hd), qkv.dtype)
    return _call(args, out, k_cache, v_cache, (B, heads), joined=True, has_bias=bias is not None, hd=hd,
                 group=heads // K, scale=scale, block=block, num_warps=num_warps, interpret=interpret)


def reference_qkv(qkv, bias, k_cache, v_cache, mask, index, *, heads: int, attention):
    """The XLA form of `pallas_decode_attention_qkv`: bias add, split, cache writes, `attention`
    (the caller's (q, k_new, v_new, k_cache, v_cache, mask, index) -> (o, k_cache, v_cache))."""
    B = qkv.shape[0]
    K, hd = k_cache.shape[1], k_cache.shape[3]
    if bias is not None:
        qkv = qkv + bias.astype(qkv.dtype)
    q, k, v = jnp.split(qkv, [heads * hd, (heads + K) * hd], axis=-1)
    q = q.reshape(B, 1, heads, hd)
    k, v = (t.reshape(B, 1, K, hd).transpose(0, 2, 1, 3) for t in (k, v))
    o, kc, vc = attention(q, k, v, k_cache, v_cache, mask, index)
    return o.reshape(B, 1, heads * hd), kc, vc


def decode_attention(q, k_new, v_new, k_cache, v_cache, mask, index, *, scale: float,
                     fallback: Callable, block: int = 32, interpret: Optional[bool] = None):
    """`pallas_decode_attention` when lowered for CUDA, `fallback` (same arguments and results:
    the XLA cache writes and attention) on other platforms; interpret=True: the kernel interpreted."""
    kern = functools.partial(pallas_decode_attention, scale=scale, block=block)
    if interpret is not None:
        return kern(q, k_new, v_new, k_cache, v_cache, mask, index, interpret=interpret)
    return jax.lax.platform_dependent(q, k_new, v_new, k_cache, v_cache, mask, index,
                                      cuda=kern, default=fallback)


def decode_attention_qkv(qkv, bias, k_cache, v_cache, mask, index, *, heads: int, scale: float,
                         attention: Callable, block: int = 32, interpret: Optional[bool] = None):
    """`pallas_decode_attention_qkv` when lowered for CUDA, `reference_qkv` with `attention` (the
    XLA cache writes and attention, as `decode_attention`'s fallback) elsewhere."""
    kern = functools.partial(pallas_decode_attention_qkv, heads=heads, scale=scale, block=block)
    if interpret is not None:
        return kern(qkv, bias, k_cache, v_cache, mask, index, interpret=interpret)
    ref = functools.partial(reference_qkv, heads=heads, attention=attention)
    return jax.lax.platform_dependent(qkv, bias, k_cache, v_cache, mask, index, cuda=kern, default=ref)
