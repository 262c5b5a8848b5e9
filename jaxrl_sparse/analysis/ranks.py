"""Rank statistics of weight updates ΔW = W_t - W_0, batched SVDs over stacked layers.

For a matrix A [m, n] with singular values σ_1 >= ... >= σ_k >= 0, k = min(m, n):

    classical rank  = #{i : σ_i > σ_1 · max(m, n) · eps_fp32}     (numpy.linalg.matrix_rank's tol)
    effective rank  = exp(-Σ p_i log p_i),  p_i = σ_i / Σ_j σ_j,  0·log 0 = 0  (Roy & Vetterli 2007)
    stable rank     = ‖A‖_F² / σ_1²
    *_frac          = rank / min(m, n)

A zero matrix has all three ranks 0 (by definition here: it updates nothing).
Every statistic is scale-invariant, so A is divided by max|A| before the SVD: a 1e-30-scale update
keeps its rank instead of underflowing (‖A‖_F² of it would be 0 in fp32). Everything is fp32.

Matrices of one shape (after transposing tall ones: σ(A) = σ(Aᵀ)) share one batched SVD call.
Cost, measured on one H100 for every matrix of gpt2-medium (96 of 1024², 48 of 1024x4096, the
1024x50257 head): ~9 s, the same as torch CUDA `svdvals` (8.1 s; both are cuSOLVER, Jacobi per
matrix up to 1024, gesvd above); torch CPU takes ~23 s. So log ranks every tens of steps.
"""
from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.analysis import deltas

_EPS32 = float(np.finfo(np.float32).eps)


def spectrum_stats(x: jax.Array) -> Dict[str, jax.Array]:
    """Rank statistics of each matrix in x [..., m, n] (fp32), each output shaped [...].

    Keys: rank, effective, stable (and *_frac of min(m, n)), fro (‖x‖_F).
    """
    x = x.astype(jnp.float32)
    m, n = x.shape[-2], x.shape[-1]
    scale = jnp.max(jnp.abs(x), axis=(-2, -1))                       # [...]
    safe = jnp.where(scale > 0, scale, 1.0)
    xn = x / safe[..., None, None]
    s = jnp.linalg.svd(xn, compute_uv=False)                           # [..., k], descending
    s_max = s[..., 0]
    rank = jnp.sum(s > (s_max * max(m, n) * _EPS32)[..., None], axis=-1)
    s_sum = jnp.sum(s, axis=-1)
    p = s / jnp.where(s_sum > 0, s_sum, 1.0)[..., None]
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    effective = jnp.where(s_sum > 0, jnp.exp(entropy), 0.0)
    fro2 = jnp.sum(xn * xn, axis=(-2, -1))
    stable = jnp.where(s_max > 0, fro2 / jnp.where(s_max > 0, s_max * s_max, 1.0), 0.0)
    full = float(min(m, n))
    return {
        "rank": rank.astype(jnp.float32), "rank_frac": rank / full,
        "effective": effective, "effective_frac": effective / full,
        "stable": stable, "stable_frac": stable / full,
        "fro": scale * jnp.sqrt(fro2),
    }


def _entry_stats(d: jax.Array, tau, large_update_factor):
    """Per matrix of d [L, m, n]: % entries with |d| > tau, and fraction of *large* entries:
    |d| > large_update_factor · mean|d| (mean over that matrix; 0 for a zero matrix)."""
    a = jnp.abs(d)
    density = 100.0 * jnp.mean(a > tau, axis=(-2, -1))
    mean = jnp.mean(a, axis=(-2, -1), keepdims=True)
    large = jnp.where(mean[..., 0, 0] > 0,
                      jnp.mean(a > large_update_factor * mean, axis=(-2, -1)), 0.0)
    return density, large


@jax.jit
def tree_delta_stats(w0: Dict[str, jax.Array], wt: Dict[str, jax.Array], tau, large_update_factor):
    """All statistics of ΔW = wt - w0 for dicts of leaves, in one jitted program.

    Returns ({path: {stat: [L]}} for leaves with ndim >= 2 (leading axes flattened to L; stats of
    `spectrum_stats` plus density (%) and large_frac), {path: int32 count of |ΔW| > tau}).
    """
    n_upd, groups = {}, {}
    for k in w0:
        d = wt[k].astype(jnp.float32) - w0[k].astype(jnp.float32)
        n_upd[k] = jnp.sum(jnp.abs(d) > tau, dtype=jnp.int32)          # a leaf has < 2^31 entries
        if d.ndim < 2:
            continue
        d = d.reshape((-1,) + d.shape[-2:])                          # [L, m, n]
        if d.shape[1] > d.shape[2]:
            d = jnp.swapaxes(d, 1, 2)           # σ(A) = σ(Aᵀ): share one SVD call per shape
        groups.setdefault(d.shape[1:], []).append((k, d))
    out = {}
    for members in groups.values():             # one batched SVD per distinct matrix shape
        x = jnp.concatenate([d for _, d in members]) if len(members) > 1 else members[0][1]
        stats = spectrum_stats(x)
        stats["density"], stats["large_frac"] = _entry_stats(x, tau, large_update_factor)
        start = 0
        for k, d in members:
            out[k] = {name: v[start:start + d.shape[0]] for name, v in stats.items()}
            start += d.shape[0]
    return out, n_upd


def layer_rank_stats(params_t, params_0, *, tau: float, include_regex: Optional[str] = None,
                     large_update_factor: float = 3.0) -> Dict[str, float]:
    """Flat metrics of ΔW = params_t - params_0 for every tracked matrix, for training logs.

    Keys `rank/<name>/<stat>` with name `layers.<l>.<module>` (stacked kernels) or `<module>`
    (e.g. `lm_head`), stat in rank, rank_frac, effective, effective_frac, stable, stable_frac, fro,
    density (% of entries with |ΔW| > tau), large_frac (fraction of entries with
    |ΔW| > large_update_factor · mean|ΔW| of that matrix); plus `rank/global/density` (% of all
    tracked weights with |ΔW| > tau). One jitted call (recompiles only if the tree changes;
    tau and the factor are traced). 1-D tracked leaves count in the global density only.
    """
    sel_t = deltas.select_tracked(params_t, include_regex)
    sel_0 = {k: tree_flat_get(params_0, k) for k in sel_t}
    deltas.check_same_layout(sel_t, sel_0, "params_t", "params_0")
    stats, n_upd = jax.device_get(tree_delta_stats(sel_0, sel_t, jnp.float32(tau),
                                                   jnp.float32(large_update_factor)))
    out: Dict[str, float] = {}
    for path, st in stats.items():
        n_layers, _, _ = deltas.matrix_layout(sel_t[path].shape)
        for i in range(n_layers or 1):
            name = deltas.matrix_name(path, i if n_layers is not None else None)
            for key, val in st.items():
                out[f"rank/{name}/{key}"] = float(np.asarray(val)[i])
    n_total = sum(int(c) for c in n_upd.values())                       # exact Python int
    out["rank/global/density"] = 100.0 * n_total / max(deltas.n_weights(sel_t), 1)
    return out


def tree_flat_get(tree, path: str):
    """Leaf at a `/`-joined path of a nested dict."""
    node = tree
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError, IndexError) as e:
            raise deltas.UserError(f"parameter {path!r} is missing from the base tree; "
                                   "compare checkpoints of the same model") from e
    return node
