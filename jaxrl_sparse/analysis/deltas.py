"""Which weights did fine-tuning change: jitted, exact counts over tracked matrices.

A weight w is *updated* between W_0 and W_t under one of three views:

    tau:   |W_t - W_0| > tau            (in fp32; the seed's definition, one view per tau)
    exact: W_t != W_0                   (in fp32)
    bf16:  bf16(W_t) != bf16(W_0)       (the change survives a bf16 cast)

For a step t and view v with updated set I_t (and I_T at the final step T):

    density_t  = 100 * |I_t| / N                 (N = number of tracked weights)
    coverage_t = 100 * |I_t ∩ I_T| / |I_T|       (how much of the final subnetwork exists at t)

Counts are exact: each jitted function returns int32 counts per matrix *row* (a row has far fewer
than 2^31 entries), and the host sums rows in int64, so 10^9+ weight models count exactly.
Per-row counts also give per-layer counts of stacked kernels for free.
"""
from __future__ import annotations

import dataclasses
import math
import re
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse import tree as tree_lib
from jaxrl_sparse.errors import UserError

# Attention + MLP kernels of every layer and the untied LM head (BUILD_NOTES.md layout).
DEFAULT_INCLUDE = r"layers/(attn|mlp)/.*/kernel|lm_head/kernel"


@dataclasses.dataclass(frozen=True)
class View:
    """One definition of "updated": kind 'tau' (with `tau`), 'exact' or 'bf16'."""
    kind: str
    tau: Optional[float] = None

    @property
    def name(self) -> str:
        return f"tau={self.tau:g}" if self.kind == "tau" else self.kind


def make_views(taus: Sequence[float]) -> Tuple[View, ...]:
    """One view per tau (ascending), then 'exact' and 'bf16'."""
    if not taus:
        raise UserError("no taus given; pass e.g. --taus=1e-7,1e-6,1e-5")
    if any(not (t >= 0 and math.isfinite(t)) for t in taus):
        raise UserError(f"taus must be finite and >= 0, got {list(taus)}")
    return tuple(View("tau", float(t)) for t in sorted(set(taus))) + (View("exact"), View("bf16"))


def select_tracked(params, include: Optional[str] = None) -> Dict[str, object]:
    """`{path: leaf}` of the tracked parameters (regex searched in `a/b/c` paths)."""
    pattern = include or DEFAULT_INCLUDE
    try:
        re.compile(pattern)
        return tree_lib.select(params, pattern, what="tracked parameters")
    except re.error as e:
        raise UserError(f"--include={pattern!r} is not a valid regex ({e}); fix the pattern") from e
    except ValueError as e:
        raise UserError(f"{e} (--include)") from e


def tracked_paths(params_meta, include: Optional[str] = None) -> List[str]:
    """Tracked paths of a tree of arrays or of Orbax metadata (anything with `.shape`)."""
    return list(select_tracked(params_meta, include))


# ---------------------------------------------------------------------------- matrices & names


def module_name(path: str) -> str:
    """`layers/attn/q_proj/kernel` -> `attn.q_proj`; `lm_head/kernel` -> `lm_head`."""
    p = path[len("layers/"):] if path.startswith("layers/") else path
    p = p[: -len("/kernel")] if p.endswith("/kernel") else p
    return p.replace("/", ".")


def matrix_layout(shape: Sequence[int]) -> Tuple[Optional[int], int, int]:
    """(n_layers or None, rows, cols) of a leaf seen as matrices.

    [L, m, n] (and [..., m, n], leading axes flattened) -> L matrices; [m, n] -> one unstacked
    matrix (layer None); [n] and scalars -> one 1 x n "matrix" (no ranks are computed for them).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 3:
        return math.prod(shape[:-2]), shape[-2], shape[-1]
    if len(shape) == 2:
        return None, shape[0], shape[1]
    return None, 1, (shape[0] if shape else 1)


def matrix_name(path: str, layer: Optional[int]) -> str:
    """Display/metric name: `layers.3.attn.q_proj` for layer 3 of a stacked kernel, else module."""
    return module_name(path) if layer is None else f"layers.{layer}.{module_name(path)}"


# ---------------------------------------------------------------------------- jitted counts


def updated(w0: jax.Array, wt: jax.Array, view: View) -> jax.Array:
    """Boolean [same shape]: entries counted as updated under `view`."""
    if view.kind == "bf16":
        return wt.astype(jnp.bfloat16) != w0.astype(jnp.bfloat16)
    a, b = w0.astype(jnp.float32), wt.astype(jnp.float32)
    if view.kind == "exact":
        return a != b
    return jnp.abs(b - a) > view.tau


def _updated_stack(w0, wt, views: Tuple[View, ...]) -> jax.Array:
    """Boolean [V, ...]: `updated` for every view, stacked (XLA fuses it into the reductions)."""
    return jnp.stack([updated(w0, wt, v) for v in views])


def _stack_row_counts(mask: jax.Array) -> jax.Array:
    """int32 [V, rows] from a boolean [V, ...] (one reduction for all views)."""
    m = mask.reshape(mask.shape[0], -1, mask.shape[-1] if mask.ndim > 2 else mask[0].size)
    return jnp.sum(m, axis=-1, dtype=jnp.int32)


@partial(jax.jit, static_argnames=("views",))
def step_counts(w0: Mapping[str, jax.Array], wt: Mapping[str, jax.Array],
                wf: Mapping[str, jax.Array], views: Tuple[View, ...]):
    """Per tracked leaf: (active [V, rows], inter [V, rows]) int32 row counts.

    active = |I_t| rows, inter = |I_t ∩ I_T| rows, for each view (I_T from `wf`, the final step).
    """
    out = {}
    for k in w0:
        ut = _updated_stack(w0[k], wt[k], views)
        uf = _updated_stack(w0[k], wf[k], views)
        out[k] = (_stack_row_counts(ut), _stack_row_counts(ut & uf))
    return out


@partial(jax.jit, static_argnames=("views",))
def overlap_counts(w0a, wfa, w0b, wfb, views: Tuple[View, ...]):
    """Per tracked leaf: (|I1| [V, rows], |I2| [V, rows], |I1 ∩ I2| [V, rows]) of two runs' final
    subnetworks, each relative to its own base; and {leaf: bool} whether the two bases are equal."""
    out, same = {}, {}
    for k in w0a:
        u1 = _updated_stack(w0a[k], wfa[k], views)
        u2 = _updated_stack(w0b[k], wfb[k], views)
        out[k] = (_stack_row_counts(u1), _stack_row_counts(u2), _stack_row_counts(u1 & u2))
        same[k] = jnp.array_equal(w0a[k], w0b[k])
    return out, same


def totals(row_counts: Mapping[str, jax.Array]) -> np.ndarray:
    """int64 [V]: sums [V, rows] row counts over rows and leaves, on the host."""
    from jaxrl_sparse.parallel import to_host   # multi-host: arrays split over processes
    host = to_host(dict(row_counts))
    return sum(np.asarray(c, np.int64).sum(axis=-1) for c in host.values())


def per_layer_counts(path: str, shape: Sequence[int], rows: np.ndarray) -> List[Tuple[Optional[int], int]]:
    """[(layer, count)] from one leaf's [rows] counts (layer None for unstacked leaves)."""
    n_layers, _, _ = matrix_layout(shape)
    rows = np.asarray(rows, np.int64)
    if n_layers is None:
        return [(None, int(rows.sum()))]
    return [(l, int(c)) for l, c in enumerate(rows.reshape(n_layers, -1).sum(axis=1))]


def n_weights(tracked: Mapping[str, object]) -> int:
    """Number of tracked scalars (exact Python int)."""
    return sum(math.prod(x.shape) for x in tracked.values())


def check_same_layout(a: Mapping[str, object], b: Mapping[str, object], what_a: str, what_b: str):
    """UserError unless both trees hold the same tracked paths with the same shapes."""
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))[:5]
        raise UserError(f"{what_a} and {what_b} track different parameters (e.g. {diff}); "
                        "are they the same model? (check --include)")
    for k in a:
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise UserError(f"{k} has shape {tuple(a[k].shape)} in {what_a} but "
                            f"{tuple(b[k].shape)} in {what_b}; they are different models")
