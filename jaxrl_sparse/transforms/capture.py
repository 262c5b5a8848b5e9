"""Capture a Dense layer's input and output gradient instead of its weight gradient.

A fused weight-gradient + optimizer kernel (`kernels.dw_adam`) needs X and dY of each matrix, not
dW. Put zero "capture" arrays next to a Dense's kernel in the params (`with_captures`) and run the
forward under `intercepting()`: that Dense then computes x @ W through a custom VJP whose backward
returns the input gradient dY Wᵀ as usual, a zero (never materialised) gradient for W, and x and dY as
the gradients of the two capture arrays. Differentiating with respect to the captures gives X and
dY per Dense; dW is never formed. Dense layers without captures run unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

X_CAP, DY_CAP = "x_cap", "dy_cap"


@jax.custom_vjp
def _matmul(x, w, x_cap, dy_cap):
    del x_cap, dy_cap
    return jnp.matmul(x, w)


def _matmul_fwd(x, w, x_cap, dy_cap):
    del x_cap, dy_cap
    return jnp.matmul(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return jnp.matmul(g, w.T), None, x, g


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _interceptor(next_fun, args, kwargs, context):
    m = context.module
    if not (isinstance(m, nn.Dense) and context.method_name == "__call__" and m.has_variable("params", X_CAP)):
        return next_fun(*args, **kwargs)
    x = args[0]
    w = m.get_variable("params", "kernel")
    dt = m.dtype or jnp.result_type(x, w)
    y = _matmul(x.astype(dt), w.astype(dt), m.get_variable("params", X_CAP), m.get_variable("params", DY_CAP))
    if m.use_bias:
        y = y + m.get_variable("params", "bias").astype(dt)
    return y


@contextlib.contextmanager
def intercepting():
    """Dense layers whose params hold captures compute through `_matmul` inside this block."""
    with nn.intercept_methods(_interceptor):
        yield


def dense_kernels(layer) -> Dict[Tuple[str, ...], Any]:
    """{path of a Dense's param dict: its kernel} for the 2-D kernels in one layer's param tree."""
    out = {}

    def walk(tree, path):
        if isinstance(tree, dict):
            k = tree.get("kernel")
            if k is not None and getattr(k, "ndim", 0) == 2:
                out[path] = k
            for name, sub in tree.items():
                if isinstance(sub, dict):
                    walk(sub, path + (name,))
    walk(layer, ())
    return out


def zero_captures(kernels: Dict[Tuple[str, ...], Any], lead: Tuple[int, ...], dtype) -> Dict[Tuple[str, ...], Dict]:
    """Zero captures for kernels {path: [K, N] array} whose Dense sees inputs [*lead, K]."""
    return {path: {X_CAP: jnp.zeros((*lead, k.shape[0]), dtype), DY_CAP: jnp.zeros((*lead, k.shape[1]), dtype)}
            for path, k in kernels.items()}


def with_captures(layer, caps: Dict[Tuple[str, ...], Dict]):
    """One layer's param tree with each path's dict of arrays merged into the param dict there (the
    capture arrays next to its kernel; a {'kernel': new} entry replaces the kernel)."""
    def put(tree, path, c):
        if not path:
            return {**tree, **c}
        return {**tree, path[0]: put(tree[path[0]], path[1:], c)}
    for path, c in caps.items():
        layer = put(layer, path, c)
    return layer
