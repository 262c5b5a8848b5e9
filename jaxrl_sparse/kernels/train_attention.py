"""Causal attention over a whole short sequence (the PPO update's forward) as one kernel, and its
backward as two more.

XLA runs a training step's attention of one layer as ~25 kernels forward and backward (the q·kᵀ and
p·v gemms, masking, the softmax's reductions, their transposes, head-layout transposes). For short
sequences (PPO: 80 tokens) each is a few microseconds of mostly idle GPU. Here one Pallas (Triton)
kernel covers the whole sequence in blocks of `block` tokens (flash-attention
style: one program per (row, head, query block) runs the online softmax forward and keeps the
log-sum-exp; the backward recomputes the probabilities block by block in two kernels, dk/dv per key
block and dq per query block, so no two programs add into one output). Key blocks after a query block
are skipped (the decoder's masks are causal); within the visited blocks the caller's mask decides.
q, k, v are read in the projections' [B, T, heads, hd] layout (no transposes). Products are TF32 on
the GPU, as XLA's default f32 precision there. Rows that see no key (left padding) get a zero output
(XLA's masked softmax gives them a uniform average): such rows are never attended to and never in
a loss, so results agree wherever they are used.

`attention` picks the kernels when lowered for CUDA and the caller's XLA path elsewhere
(`lax.platform_dependent`); interpret=True runs the kernels in the Pallas interpreter (CPU tests).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

NEG = -1e30
BLOCK = 16  # Triton's smallest dot tile


def supported(T: int, head_dim: int, block: int = BLOCK) -> bool:
    """Shapes the kernels take: T a multiple of the block (and > 1), a power-of-two head size >= 16."""
    return T > 1 and T % block == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _scores(q_ref, k_ref, m_ref, b, h, kh, i, j, bt: int, scale: float):
    """Query block i's rows and key block j's scores (TF32 products, scaled, masked) and its mask."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    rows, cols = pl.ds(i * bt, bt), pl.ds(j * bt, bt)
    q = q_ref[b, rows, h, :].astype(jnp.float32)
    k = k_ref[b, cols, kh, :].astype(jnp.float32)
    ok = m_ref[b, rows, cols] != 0
    return q, k, ok, jnp.where(ok, plgpu.dot(q, k, trans_b=True) * scale, NEG)


def _fwd_kernel(q_ref, k_ref, v_ref, m_ref, o_ref, lse_ref, *, bt: int, group: int, scale: float):
    """One program per (row, query head, query block): online softmax over key blocks 0..i."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    f32 = jnp.float32
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = h // group
    hd = q_ref.shape[-1]

    def body(j, carry):
        m_i, l_i, acc = carry
        _, _, ok, s = _scores(q_ref, k_ref, m_ref, b, h, kh, i, j, bt, scale)
        v = v_ref[b, pl.ds(j * bt, bt), kh, :].astype(f32)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_i - m_new)
        return m_new, l_i * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + plgpu.dot(p, v)

    init = (jnp.full((bt,), NEG, f32), jnp.zeros((bt,), f32), jnp.zeros((bt, hd), f32))
    m_i, l_i, acc = jax.lax.fori_loop(0, i + 1, body, init)
    seen = l_i > 0
    rows = pl.ds(i * bt, bt)
    o_ref[b, rows, h, :] = jnp.where(seen[:, None], acc / jnp.maximum(l_i, 1e-30)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[b, h, rows] = jnp.where(seen, m_i + jnp.log(jnp.maximum(l_i, 1e-30)), 0.0)


def _probs(q_ref, k_ref, m_ref, lse_ref, do_ref, o_ref, b, h, kh, i, j, bt: int, scale: float):
    """Recomputed probabilities of block (i, j) and the rows' dO and delta = rowsum(dO * O)."""
    from jax.experimental import pallas as pl
    q, k, ok, s = _scores(q_ref, k_ref, m_ref, b, h, kh, i, j, bt, scale)
    rows = pl.ds(i * bt, bt)
    p = jnp.where(ok, jnp.exp(s - lse_ref[b, h, rows][:, None]), 0.0)
    do = do_ref[b, rows, h, :].astype(jnp.float32)
    delta = jnp.sum(do * o_ref[b, rows, h, :].astype(jnp.float32), axis=1)
    return q, k, p, do, delta


def _dscores(p, do, v, delta, scale: float):
    """Gradient of block (i, j)'s scaled scores: p * (dO vᵀ - delta) * scale."""
    from jax.experimental.pallas import triton as plgpu
    return p * (plgpu.dot(do, v, trans_b=True) - delta[:, None]) * scale


def _bwd_kv_kernel(q_ref, k_ref, v_ref, m_ref, o_ref, lse_ref, do_ref, dk_ref, dv_ref, *, n: int, bt: int,
                   group: int, scale: float):
    """One program per (row, query head, key block j): dk, dv over query blocks j..n-1."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    f32 = jnp.float32
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = h // group
    cols = pl.ds(j * bt, bt)
    v = v_ref[b, cols, kh, :].astype(f32)

    def body(i, carry):
        dk, dv = carry
        q, _, p, do, delta = _probs(q_ref, k_ref, m_ref, lse_ref, do_ref, o_ref, b, h, kh, i, j, bt, scale)
        ds = _dscores(p, do, v, delta, scale)
        return dk + plgpu.dot(ds, q, trans_a=True), dv + plgpu.dot(p, do, trans_a=True)

    zero = jnp.zeros(v.shape, f32)
    dk, dv = jax.lax.fori_loop(j, n, body, (zero, zero))
    dk_ref[b, cols, h, :] = dk.astype(dk_ref.dtype)
    dv_ref[b, cols, h, :] = dv.astype(dv_ref.dtype)


def _bwd_q_kernel(q_ref, k_ref, v_ref, m_ref, o_ref, lse_ref, do_ref, dq_ref, *, bt: int, group: int, scale: float):
    """One program per (row, query head, query block i): dq over key blocks 0..i."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    f32 = jnp.float32
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = h // group

    def body(j, dq):
        _, k, p, do, delta = _probs(q_ref, k_ref, m_ref, lse_ref, do_ref, o_ref, b, h, kh, i, j, bt, scale)
        ds = _dscores(p, do, v_ref[b, pl.ds(j * bt, bt), kh, :].astype(f32), delta, scale)
        return dq + plgpu.dot(ds, k)

    dq = jax.lax.fori_loop(0, i + 1, body, jnp.zeros((bt, q_ref.shape[-1]), f32))
    dq_ref[b, pl.ds(i * bt, bt), h, :] = dq.astype(dq_ref.dtype)


def _call(kernel, args, outs, grid, name: str, num_warps: int, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    whole = pl.no_block_spec
    return pl.pallas_call(kernel, grid=grid, in_specs=[whole] * len(args), out_specs=tuple(whole for _ in outs),
                          out_shape=tuple(outs), compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                                                                      num_stages=1),
                          interpret=interpret, name=name)(*args)


def _forward(q, k, v, mask, scale, block, num_warps, interpret):
    B, T, H, hd = q.shape
    kern = functools.partial(_fwd_kernel, bt=block, group=H // k.shape[2], scale=scale)
    outs = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    return _call(kern, (q, k, v, mask), outs, (B, H, T // block), "attention_fwd", num_warps, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def pallas_attention(q, k, v, mask, scale: float, block: int = BLOCK, num_warps: int = 4, interpret: bool = False):
    """q [B, T, H, hd], k / v [B, T, K, hd] (K divides H), mask [B, T, T] int8 (causal, as the
    decoder builds it) -> [B, T, H, hd] in q's dtype."""
    return _forward(q, k, v, mask, scale, block, num_warps, interpret)[0]


def _vjp_fwd(q, k, v, mask, scale, block, num_warps, interpret):
    o, lse = _forward(q, k, v, mask, scale, block, num_warps, interpret)
    return o, (q, k, v, mask, o, lse)


def _vjp_bwd(scale, block, num_warps, interpret, res, do):
    q, k, v, mask, o, lse = res
    B, T, H, hd = q.shape
    K, n = k.shape[2], T // block
    args = (q, k, v, mask, o, lse, do)
    per_head = jax.ShapeDtypeStruct(q.shape, jnp.float32)  # dk, dv per query head; summed over each group
    kv = functools.partial(_bwd_kv_kernel, n=n, bt=block, group=H // K, scale=scale)
    dk, dv = _call(kv, args, (per_head, per_head), (B, H, n), "attention_bwd_kv", num_warps, interpret)
    qk = functools.partial(_bwd_q_kernel, bt=block, group=H // K, scale=scale)
    (dq,) = _call(qk, args, (per_head,), (B, H, n), "attention_bwd_q", num_warps, interpret)
    fold = lambda d, like: d.reshape(B, T, K, H // K, hd).sum(3).astype(like.dtype)
    return dq.astype(q.dtype), fold(dk, k), fold(dv, v), None


pallas_attention.defvjp(_vjp_fwd, _vjp_bwd)


def attention(q, k, v, mask, *, scale: float, fallback: Callable, block: int = BLOCK,
              interpret: Optional[bool] = None):
    """`pallas_attention` (mask as int8) when lowered for CUDA, `fallback(q, k, v, mask)` (the XLA
    path; mask bool [B, T, T]) on other platforms; interpret=True: the kernels interpreted."""
    kern = lambda q, k, v, mask: pallas_attention(q, k, v, mask.astype(jnp.int8), float(scale), block, 4,
                                                  bool(interpret))
    if interpret is not None:
        return kern(q, k, v, mask)
    return jax.lax.platform_dependent(q, k, v, mask, cuda=kern, default=fallback)
