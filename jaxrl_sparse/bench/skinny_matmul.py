"""A @ B for few rows and a long contraction, split over the contraction: one Pallas (Triton) kernel.

A candidate rewrite that `python -m launch.bench gemm --parts=skinny` times against XLA's product;
the trainer does not run it (measured on an H100, below).

The PPO update's mini-batch step multiplies M = 320 rows (4 sequences x 80 tokens) by each weight
matrix of gpt2-medium, forward (x @ W) and backward (dY @ Wᵀ). With N = 1024 outputs and 128 x 128
tiles that is 24 programs on a 132-SM H100, each walking a contraction of up to 4096. Here the grid
is (row tiles, column tiles, splits): program (i, j, s) computes tile (i, j) over the s-th slice of
the contraction and writes it to partials [S, M, N]; `matmul` sums the partials (in a trainer XLA
would fuse that sum into the consumer, e.g. the bias and residual add). The summation order is
fixed, so results are deterministic.

Measured (session 14, BENCHMARKS.md): at M = 320 the best tiles beat XLA (cuBLAS) only on the
long-contraction products (mlp down forward 38.7 -> 33.0 µs, q/k/v input gradient 24.6 -> 19.7 µs)
and lose on the others (mlp up forward 18.2 -> 29.0 µs); with the weight in its [K, N] layout (not
contiguous along the contraction) Triton's TF32 products are up to 3.6x slower than with the same
tiles on a [N, K] weight. At M = 16 (decode)
it ties XLA. Not worth a custom VJP in the update.

fp32 products run as TF32 on the GPU (XLA's default precision for the gemm this replaces).
trans_b: B is stored [N, K] (the product is A @ Bᵀ), the layout in which both operands are
contiguous along the contraction, which Hopper's TF32 tensor-core instructions read directly.

`matmul` picks the kernel when lowered for CUDA and XLA's product elsewhere (`lax.platform_dependent`);
interpret=True runs the kernel in the Pallas interpreter (CPU tests).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Tiles(NamedTuple):
    """Output tile (bm x bn), contraction step bk, contraction splits, Triton launch knobs."""
    bm: int = 64
    bn: int = 128
    bk: int = 32
    splits: int = 4
    num_warps: int = 4
    num_stages: int = 3


def name(t: Tiles) -> str:
    return f"{t.bm}x{t.bn}x{t.bk}k{t.splits}w{t.num_warps}s{t.num_stages}"


def parse(spec: str) -> Tiles:
    """'64x128x32k4w4s3' -> Tiles(64, 128, 32, splits=4, num_warps=4, num_stages=3); without 'kS', 1 split."""
    import re
    from jaxrl_sparse.errors import UserError
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:k(\d+))?w(\d+)s(\d+)", spec.strip())
    if not m:
        raise UserError(f"tiles {spec!r}: write BMxBNxBK[kSPLITS]wWARPSsSTAGES, e.g. 64x128x32k4w4s3")
    bm, bn, bk, k, w, st = m.groups()
    return Tiles(int(bm), int(bn), int(bk), int(k or 1), int(w), int(st))


def fits(M: int, K: int, N: int, t: Tiles) -> bool:
    """Whether the tiles divide an [M, K] @ [K, N] product (each split a whole number of bk steps)."""
    return M % t.bm == 0 and N % t.bn == 0 and K % (t.splits * t.bk) == 0


def reference(a, b, trans_b: bool = False):
    """XLA's product: a @ b, or a @ bᵀ with trans_b."""
    return a @ (b.T if trans_b else b)


def _kernel(a_ref, b_ref, o_ref, *, t: Tiles, chunk: int, trans_b: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, cols = pl.ds(i * t.bm, t.bm), pl.ds(j * t.bn, t.bn)

    def body(step, acc):
        ks = pl.ds(s * chunk + step * t.bk, t.bk)
        a = a_ref[rows, ks]
        if trans_b:
            return acc + plgpu.dot(a, b_ref[cols, ks], trans_b=True)
        return acc + plgpu.dot(a, b_ref[ks, cols])

    acc = jax.lax.fori_loop(0, chunk // t.bk, body, jnp.zeros((t.bm, t.bn), jnp.float32))
    o_ref[s, rows, cols] = acc


def partials(a, b, *, trans_b: bool = False, tiles: Tiles = Tiles(), interpret: bool = False):
    """The kernel alone: [splits, M, N] f32 partial products (their sum is a @ b, or a @ bᵀ)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    M, K = a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    if not fits(M, K, N, tiles):
        raise ValueError(f"skinny_matmul: tiles {name(tiles)} do not divide [{M}, {K}] @ [{K}, {N}]")
    kern = functools.partial(_kernel, t=tiles, chunk=K // tiles.splits, trans_b=trans_b)
    whole = pl.no_block_spec
    return pl.pallas_call(
        kern, out_shape=jax.ShapeDtypeStruct((tiles.splits, M, N), jnp.float32),
        grid=(M // tiles.bm, N // tiles.bn, tiles.splits), in_specs=[whole, whole], out_specs=whole,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret, name="skinny_matmul")(a, b)


def matmul(a, b, *, trans_b: bool = False, tiles: Tiles = Tiles(), interpret: Optional[bool] = None):
    """a [M, K] @ b [K, N] (or @ bᵀ for b [N, K] with trans_b), f32 -> [M, N] f32: the split kernel
    plus the sum of its partials when lowered for CUDA, XLA's product elsewhere; interpret=True: the
    kernel interpreted."""
    kern = lambda a, b: partials(a, b, trans_b=trans_b, tiles=tiles, interpret=bool(interpret)).sum(0)
    if interpret is not None:
        return kern(a, b)
    return jax.lax.platform_dependent(a, b, cuda=kern, default=functools.partial(reference, trans_b=trans_b))
