"""Weight gradient and Adam step in one kernel: dW = Xᵀ dY feeds the Adam update tile by tile.

A training step normally writes each weight gradient to memory (the dW gemm) and reads it back
(the optimizer): 8 of Adam's 28 bytes per fp32 parameter, plus one kernel per matrix. Here one
Pallas (Triton) kernel computes a tile of dW from the layer's input X [M, K] and output gradient
dY [M, N] (M = tokens of the mini-batch, a short contraction) and, in the same program, updates that
tile's parameters and Adam moments in place. The gradient never leaves registers.

The arithmetic is optax.adam's (`scale_by_adam` + `scale_by_learning_rate` + `apply_updates`):
    mu' = (1-b1) g + b1 mu,  nu' = (1-b2) g² + b2 nu,
    p'  = p + (-lr) · (mu'/c1) / (sqrt(nu'/c2 + eps_root) + eps),  c = 1 - b^count (count after the step).
fp32 products run as TF32 on the GPU, as XLA's default precision does for the gemm it replaces.

`dw_adam_reference` is the same step in plain jnp (XLA's gemm + elementwise); `dw_adam` runs the kernel
(interpreted off the GPU, which the CPU tests use).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

MIN_BLOCK = 16  # Triton's smallest dot tile


class AdamHyper(NamedTuple):
    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0


class Blocks(NamedTuple):
    """Tile of the weight matrix per program (bk x bn), rows of X/dY per dot (bm), Triton launch knobs.

    transposed: X and dY go in as [K, M] and [N, M] (a transpose before the kernel), so both dot
    operands are contiguous along the contraction, the layout Hopper's TF32 tensor-core instructions
    read; prefetch: the tile's weights and moments are loaded before the contraction loop, so
    their memory reads overlap it; programs: 0 = one program per tile; N > 0 = N programs, each
    stepping through every N-th tile (the largest divisor of the tile count up to N is used),
    so the kernel holds fewer of the GPU's block slots while it runs beside the backward pass (a
    CUDA graph in XLA's CONCURRENT mode, `jaxrl_sparse.xla_options`). Tiles and stages were the
    fastest alone on an H100 for gpt2-medium's matrices at M = 320 (`python -m launch.bench gemm
    --parts=dw_adam`); 256 programs (two per SM there) are slower alone but the fastest inside the
    PPO update (`python -m launch.bench ppo --fused_blocks=...`; BENCHMARKS.md, session 15)."""
    bk: int = 32
    bn: int = 64
    bm: int = 64
    num_warps: int = 4
    num_stages: int = 3
    transposed: bool = True
    prefetch: bool = False
    programs: int = 256


def corrections(count, hyper: AdamHyper) -> jax.Array:
    """[1 - b1^count, 1 - b2^count] (f32) for the count after this step, as optax computes them."""
    return jnp.stack([1 - hyper.b1 ** count, 1 - hyper.b2 ** count]).astype(jnp.float32)


def _fit(pref: int, dim: int) -> int:
    """The largest power-of-two tile <= pref dividing dim (0 if none >= MIN_BLOCK)."""
    b = pref
    while b >= MIN_BLOCK and dim % b:
        b //= 2
    return b if b >= MIN_BLOCK else 0


def fit_blocks(K: int, N: int, blocks: Blocks = Blocks()) -> Optional[Blocks]:
    """Blocks shrunk to divide a [K, N] weight (and programs to divide its tile count); None when a
    side has no tile >= 16 (use XLA there)."""
    bk, bn = _fit(blocks.bk, K), _fit(blocks.bn, N)
    if not (bk and bn):
        return None
    return blocks._replace(bk=bk, bn=bn, programs=_programs((K // bk) * (N // bn), blocks.programs))


def _programs(tiles: int, pref: int) -> int:
    """The largest divisor of `tiles` up to pref (0: one program per tile)."""
    return max((d for d in range(1, min(pref, tiles) + 1) if tiles % d == 0), default=0)


def _adam_tile(g, p, mu, nu, c1, c2, hyper: AdamHyper):
    mu = (1 - hyper.b1) * g + hyper.b1 * mu
    nu = (1 - hyper.b2) * (g * g) + hyper.b2 * nu
    upd = (mu / c1) / (jnp.sqrt(nu / c2 + hyper.eps_root) + hyper.eps)
    return p + (-hyper.lr) * upd, mu, nu


def dw_adam_reference(x, dy, p, mu, nu, corr, mask=None, *, hyper: AdamHyper):
    """The fused step in plain jnp: g = xᵀ dy (masked), then optax's Adam on p, mu, nu [K, N]."""
    g = jnp.einsum("mk,mn->kn", x, dy, preferred_element_type=jnp.float32).astype(p.dtype)
    if mask is not None:
        g = g * mask.astype(g.dtype)
    return _adam_tile(g, p, mu, nu, corr[0], corr[1], hyper)


def _kernel(x_ref, dy_ref, c_ref, p_ref, m_ref, v_ref, *rest, M: int, blocks: Blocks, hyper: AdamHyper,
            masked: bool, n_cols: int = 0, per_program: int = 0):
    """One tile (i, j) per program; with blocks.programs, program q does tiles q, q + P, q + 2P, ...
    (per_program of them; n_cols tiles per row of the weight), its refs the whole arrays."""
    from jax.experimental import pallas as pl
    mask_ref, (po, mo, vo) = (rest[0], rest[1:]) if masked else (None, rest)
    if not blocks.programs:
        tile = (x_ref, dy_ref, c_ref, p_ref, m_ref, v_ref, mask_ref, po, mo, vo)
        return _tile(*tile, pl.program_id(0), pl.program_id(1), M=M, blocks=blocks, hyper=hyper, whole=False)

    q = pl.program_id(0)  # read outside the loop (the interpreter does not see it inside)

    def step(n, carry):
        t = q + n * blocks.programs
        _tile(x_ref, dy_ref, c_ref, p_ref, m_ref, v_ref, mask_ref, po, mo, vo, t // n_cols, t % n_cols,
              M=M, blocks=blocks, hyper=hyper, whole=True)
        return carry

    jax.lax.fori_loop(0, per_program, step, 0)


def _tile(x_ref, dy_ref, c_ref, p_ref, m_ref, v_ref, mask_ref, po, mo, vo, i, j, *, M: int, blocks: Blocks,
          hyper: AdamHyper, whole: bool):
    """Tile (i, j) of the weight: its gradient from X and dY, then its Adam step. whole: the weight,
    moment and mask refs are the whole arrays (sliced here), else the tile's own blocks."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    bk, bn, bm = blocks.bk, blocks.bn, blocks.bm
    at = (pl.ds(i * bk, bk), pl.ds(j * bn, bn)) if whole else (slice(None), slice(None))
    if blocks.prefetch:
        old = p_ref[at], m_ref[at], v_ref[at]

    def body(t, acc):
        if blocks.transposed:  # x [K, M], dy [N, M]
            xs = x_ref[pl.ds(i * bk, bk), pl.ds(t * bm, bm)]
            ds = dy_ref[pl.ds(j * bn, bn), pl.ds(t * bm, bm)]
            return acc + plgpu.dot(xs, ds, trans_b=True)
        xs = x_ref[pl.ds(t * bm, bm), pl.ds(i * bk, bk)]
        ds = dy_ref[pl.ds(t * bm, bm), pl.ds(j * bn, bn)]
        return acc + plgpu.dot(xs, ds, trans_a=True)

    g = jax.lax.fori_loop(0, M // bm, body, jnp.zeros((bk, bn), jnp.float32))
    if mask_ref is not None:
        g = g * mask_ref[at].astype(jnp.float32)
    if not blocks.prefetch:
        old = p_ref[at], m_ref[at], v_ref[at]
    p, mu, nu = _adam_tile(g, *old, c_ref[0], c_ref[1], hyper)
    po[at], mo[at], vo[at] = p, mu, nu


@functools.partial(jax.jit, static_argnames=("hyper", "blocks", "interpret"))
def dw_adam(x, dy, p, mu, nu, corr, mask=None, *, hyper: AdamHyper, blocks: Blocks = Blocks(),
            interpret: Optional[bool] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K], dy [M, N], p / mu / nu [K, N] f32, corr = `corrections(count)`, mask [K, N] or None.

    Returns (p, mu, nu) after one Adam step on g = xᵀ dy (p, mu, nu are updated in place when their
    buffers can be reused). blocks must divide K and N (`fit_blocks`); M is padded to a multiple of
    blocks.bm. interpret: None = chosen when lowered: the kernel for CUDA, `dw_adam_reference` on
    other platforms (so one traced program serves both); True = the kernel interpreted (tests).
    """
    K, N = x.shape[1], dy.shape[1]
    if p.dtype != jnp.float32 or mu.dtype != jnp.float32 or nu.dtype != jnp.float32:
        raise ValueError(f"dw_adam: p, mu, nu must be float32, got {p.dtype}, {mu.dtype}, {nu.dtype}")
    if K % blocks.bk or N % blocks.bn:
        raise ValueError(f"dw_adam: blocks {blocks.bk}x{blocks.bn} do not divide the [{K}, {N}] weight")
    blocks = blocks._replace(programs=_programs((K // blocks.bk) * (N // blocks.bn), blocks.programs))
    if interpret is None:
        return jax.lax.platform_dependent(
            x, dy, p, mu, nu, corr, mask,
            cuda=functools.partial(_pallas, hyper=hyper, blocks=blocks, interpret=False),
            default=functools.partial(dw_adam_reference, hyper=hyper))
    return _pallas(x, dy, p, mu, nu, corr, mask, hyper=hyper, blocks=blocks, interpret=interpret)


def _pallas(x, dy, p, mu, nu, corr, mask, *, hyper: AdamHyper, blocks: Blocks, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    (M, K), N = x.shape, dy.shape[1]
    pad = -M % blocks.bm
    if pad:  # zero rows add nothing to xᵀ dy
        x, dy = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(dy, ((0, pad), (0, 0)))
    if blocks.transposed:
        x, dy = x.T, dy.T
    whole = pl.no_block_spec  # X, dY, corr: the kernel slices what it reads
    grid = (K // blocks.bk, N // blocks.bn)
    kern = functools.partial(_kernel, M=M + pad, blocks=blocks, hyper=hyper, masked=mask is not None)
    if blocks.programs:  # each program walks its share of the tiles through the whole arrays
        kern = functools.partial(kern, n_cols=grid[1], per_program=grid[0] * grid[1] // blocks.programs)
        tile, grid = whole, (blocks.programs,)
    else:
        tile = pl.BlockSpec((blocks.bk, blocks.bn), lambda i, j: (i, j))
    args = [x, dy, corr.astype(jnp.float32), p, mu, nu]
    if mask is not None:
        args.append(mask.astype(jnp.int8))
    out = jax.ShapeDtypeStruct((K, N), jnp.float32)
    return pl.pallas_call(
        kern, out_shape=(out, out, out), grid=grid,
        in_specs=[whole, whole, whole, tile, tile, tile] + [tile] * (mask is not None),
        out_specs=(tile, tile, tile), input_output_aliases={3: 0, 4: 1, 5: 2},
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret, name="dw_adam")(*args)
