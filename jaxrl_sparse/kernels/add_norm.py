"""Residual add + LayerNorm of a decode step's rows as one kernel.

In a decode step XLA runs each `x = x + (y + b); h = LayerNorm(x)` as three kernels: the bias and
residual add, the norm's statistics (a reduction) and the normalisation (an elementwise kernel
that broadcasts them). At batch 16 each is a ~1.5 µs launch for 16 × 1024 values. Here one Pallas
(Triton) program per row does all of it from registers and writes both the new residual stream and
the normalised row (in the dtype the next gemm reads).

Same arithmetic as the XLA path: `y + b`, then the residual add, in the stream's dtype; the
statistics in float32 as Flax's LayerNorm computes them (E[x], E[x²], var = max(0, E[x²] - E[x]²));
`(x - mean) * (rsqrt(var + eps) * scale) + bias`. Only the reductions' summation order differs.

`add_norm` picks the kernel when lowered for CUDA and `reference` elsewhere (`lax.platform_dependent`);
interpret=True runs the kernel through the Pallas interpreter (tests).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp


def supported(width: int) -> bool:
    """Row widths the kernel takes: powers of two (Triton block shapes), at least 16."""
    return width >= 16 and width & (width - 1) == 0


def _residual(x, y, b):
    """x + (y + b) in x's dtype (y or b may be None)."""
    if y is None:
        return x
    if b is not None:
        y = y + b.astype(y.dtype)
    return x + y.astype(x.dtype)


def _normalize(x, scale, bias, eps: float, out_dtype):
    """Flax's LayerNorm (use_fast_variance, float32 statistics) over the last axis."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    mean2 = jnp.mean(xf * xf, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, mean2 - mean * mean)
    mul = jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
    return ((xf - mean) * mul + bias.astype(jnp.float32)).astype(out_dtype)


def reference(x, y, b, scale, bias, *, eps: float, out_dtype=None):
    """The XLA form: (x + (y + b), LayerNorm(x + (y + b))). x, y [R, D]; b, scale, bias [D]."""
    xn = _residual(x, y, b)
    return xn, _normalize(xn, scale, bias, eps, out_dtype or jnp.float32)


def _kernel(*refs, eps: float, has_y: bool, has_b: bool):
    from jax.experimental import pallas as pl
    it = iter(refs)
    x_ref = next(it)
    y_ref = next(it) if has_y else None
    b_ref = next(it) if has_b else None
    s_ref, nb_ref, xo_ref, ho_ref = it
    r = pl.program_id(0)
    x = x_ref[r, :]
    y = y_ref[r, :] if has_y else None
    xn = _residual(x, y, b_ref[:] if has_b else None)
    xo_ref[r, :] = xn
    ho_ref[r, :] = _normalize(xn, s_ref[:], nb_ref[:], eps, ho_ref.dtype)


def pallas_add_norm(x, y, b, scale, bias, *, eps: float, out_dtype=None, num_warps: int = 4,
                    interpret: bool = False):
    """The kernel: one program per row of x [R, D] (y [R, D] and b [D] optional). Returns
    (x + (y + b) in x's dtype, its LayerNorm in out_dtype (default float32))."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    R, D = x.shape
    out_dtype = jnp.dtype(out_dtype or jnp.float32)
    b = b if y is not None else None  # a bias without a projection output is ignored (`add_norm`)
    args = [x] + [a for a in (y, b) if a is not None] + [scale, bias]
    kern = functools.partial(_kernel, eps=float(eps), has_y=y is not None, has_b=b is not None)
    whole = pl.no_block_spec
    return pl.pallas_call(
        kern, grid=(R,), in_specs=[whole] * len(args), out_specs=(whole, whole),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, out_dtype)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="add_norm")(*args)


def add_norm(x, y: Optional[jax.Array], b: Optional[jax.Array], scale, bias, *, eps: float, out_dtype=None,
             interpret: Optional[bool] = None):
    """(x + (y + b), LayerNorm of it): `pallas_add_norm` when lowered for CUDA, `reference` on other
    platforms; interpret=True: the kernel interpreted. y None: only the norm of x (b ignored)."""
    if interpret is not None:
        return pallas_add_norm(x, y, b, scale, bias, eps=eps, out_dtype=out_dtype, interpret=interpret)
    ref = functools.partial(reference, eps=eps, out_dtype=out_dtype)
    kern = functools.partial(pallas_add_norm, eps=eps, out_dtype=out_dtype)
    return jax.lax.platform_dependent(x, y, b, scale, bias, cuda=kern, default=ref)
