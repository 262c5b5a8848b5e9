"""Rank statistics of weight updates ΔW = W_t - W_0, batched over stacked layers.

For a matrix A [m, n] with singular values σ_1 >= ... >= σ_k >= 0, k = min(m, n):

    classical rank  = #{i : σ_i > tol},  tol = σ_1 · max(m, n) · eps_fp32   (numpy.linalg.matrix_rank's)
    effective rank  = exp(-Σ p_i log p_i),  p_i = σ_i / Σ_j σ_j,  0·log 0 = 0  (Roy & Vetterli 2007)
    stable rank     = ‖A‖_F² / σ_1²
    *_frac          = rank / min(m, n)

A zero matrix has all three ranks 0 (by definition here: it updates nothing).
Every statistic is scale-invariant, so A is divided by max|A| first: a 1e-30-scale update keeps
its rank instead of underflowing (‖A‖_F² of it would be 0 in fp32). Inputs and outputs are fp32.

How the singular values are computed is `method` (`RANK_METHODS`; default `DEFAULT_RANK_METHOD`).
Matrices of one shape (after transposing tall ones: σ(A) = σ(Aᵀ)) share one batched call, and
every method works on the wide orientation m <= n. Error bounds, for σ of the fp32 matrix:

* "svd"     `jnp.linalg.svd` in fp32 (GPU: cuSOLVER gesvdj up to 1024, gesvd above; CPU: gesdd).
            Backward stable: |σ̂_i - σ_i| <= p(m, n)·eps32·σ_1, p a modest polynomial. The same
            as numpy's fp32 `matrix_rank`, whose tolerance is set at about this noise level, so
            a σ_i within a few p·eps32·σ_1 of tol may be counted either way.
* "jacobi"  `lax.linalg.svd(algorithm=JACOBI)` (gesvdj for every shape; GPU only). As "svd".
* "gesvd"   `lax.linalg.svd(algorithm=QR)` (gesvd for every shape). As "svd".
* "qr"      wide A: Householder R of Aᵀ (k×k, `lax.linalg.geqrf`, Q not formed), then "svd" of R.
            σ(R) = σ(A + δA) with ‖δA‖_F <= p(m, n)·eps32·‖A‖_F: the same order as "svd".
* "gram64"  G = A Aᵀ (k×k) formed and `eigvalsh`-ed in float64 (x64 switched on inside this
            function only), σ_i = sqrt(λ_i). Products of fp32 numbers are exact in float64, so
            |λ̂_i - λ_i| <= δ = c·eps64·σ_1² with c <= max(m, n)·k + p(k) (worst case), hence
            |σ̂_i - σ_i| <= min(sqrt(δ), δ/σ_i). At σ_i ≈ tol, δ/σ_i <= 0.016·k/max(m, n)·tol:
            the classical rank is exact unless a σ sits within 1.6% of the tolerance (worst-case
            bound; typical errors are orders smaller) — tighter than "svd" itself. λ below the
            float64 floor k·eps64·λ_1 are set to 0 (σ < sqrt(k·eps64)·σ_1, ≈4.8e-7·σ_1 at
            k=1024, always far below tol), so an exactly low-rank update has zero tail σ's.
* "gram64t" as "gram64", but eigenvalues only: Householder tridiagonalisation
            (`lax.linalg.tridiagonal`, float64) + Sturm bisection to eps64·‖G‖
            (`jax.scipy.linalg.eigh_tridiagonal`), skipping eigenvectors. Same bound as "gram64".
* "gram32"  as "gram64" but in fp32 (matmul at HIGHEST precision): |λ̂ - λ| ~ k·eps32·σ_1², so
            σ below sqrt(k·eps32)·σ_1 (≈1.1e-2·σ_1 at k=1024) are set to 0. NOT exact for the
            classical rank (that floor is above tol): it counts σ_i > max(tol, floor). Effective
            and stable rank change by ~ the floored σ mass. Kept to measure.

Cost, measured on one H100 for every matrix of gpt2-medium (96 of 1024², 48 of 1024x4096, the
1024x50257 head), "svd": ~9 s, the same as torch CUDA `svdvals` (8.1 s); torch CPU ~23 s. Other
methods: `python -m launch.bench analyze --rank_methods=...` (BENCHMARKS.md).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_sparse.analysis import deltas
from jaxrl_sparse.errors import UserError

_EPS32 = float(np.finfo(np.float32).eps)

# The singular-value method every caller gets unless it passes one (PPO rank logging, the
# analyzer without --rank_method). Switching it is this one line.
DEFAULT_RANK_METHOD = "gram64"


# ---------------------------------------------------------------------------- singular values
# Each takes xn [..., m, n] fp32 with m <= n and returns σ [..., m] fp32, descending.


def _svd_algorithm(name: str):
    """`lax.linalg.SvdAlgorithm.<name>`, or None when the installed JAX lacks it."""
    algos = getattr(lax.linalg, "SvdAlgorithm", None)
    return getattr(algos, name, None) if algos is not None else None


def _sv_svd(xn):
    return jnp.linalg.svd(xn, compute_uv=False)


def _sv_svd_algorithm(xn, name: str):
    return lax.linalg.svd(xn, full_matrices=False, compute_uv=False, algorithm=_svd_algorithm(name))


def _qr_r(a):
    """R [..., n, n] of tall a [..., m, n]. LAPACK/cuSOLVER geqrf alone (JAX has no public
    R-only QR: `jnp.linalg.qr(mode='r')` also runs orgqr, forming Q)."""
    try:
        from jax._src.lax.linalg import geqrf            # private; present in JAX 0.10-0.11
    except ImportError:
        return jnp.linalg.qr(a, mode="r")
    packed, _ = geqrf(a)                                 # R in the upper triangle
    return jnp.triu(packed[..., :a.shape[-1], :])


def _sv_qr(xn):
    if xn.shape[-1] > xn.shape[-2]:                      # R of Aᵀ [n, m] is [m, m], σ(R) = σ(A)
        xn = _qr_r(jnp.swapaxes(xn, -1, -2))
    return _sv_svd(xn)


def _x64():
    """Context that switches float64 on for the code inside it (thread-local; works while tracing)."""
    state = getattr(jax, "enable_x64", None)
    if state is not None and callable(state):
        return state(True)
    from jax.experimental import enable_x64                 # older JAX
    return enable_x64()


def _tridiagonal_eigvalsh(g):
    """Eigenvalues [..., k] of symmetric g [..., k, k] without eigenvectors: sytrd + bisection."""
    k = g.shape[-1]
    _, d, e, _ = lax.linalg.tridiagonal(g, lower=True)          # d [..., k], e [..., k-1]
    batch = d.shape[:-1]
    evals = partial(jax.scipy.linalg.eigh_tridiagonal, eigvals_only=True)
    lam = jax.vmap(evals)(d.reshape((-1, k)), e.reshape((-1, max(k - 1, 0))))
    return lam.reshape(batch + (k,))


def _sv_gram(xn, dtype, tridiagonal: bool = False):
    """σ = sqrt(eigenvalues of G = xn xnᵀ [..., m, m]) computed in `dtype`; λ <= m·eps·λ_max -> 0."""
    k = xn.shape[-2]
    a = xn.astype(dtype)
    g = jnp.einsum("...ik,...jk->...ij", a, a, precision=lax.Precision.HIGHEST)
    lam = _tridiagonal_eigvalsh(g) if tridiagonal else jnp.linalg.eigvalsh(g)
    lam_max = jnp.max(lam, axis=-1, keepdims=True)
    floor = k * float(np.finfo(dtype).eps) * jnp.maximum(lam_max, 0.0)
    s = jnp.sqrt(jnp.where(lam > floor, lam, 0.0))
    return (-jnp.sort(-s, axis=-1)).astype(jnp.float32)


def _sv_gram64(xn, tridiagonal: bool = False):
    with _x64():
        return _sv_gram(xn, jnp.float64, tridiagonal)


RANK_METHODS: Dict[str, Callable] = {
    "svd": _sv_svd,
    "jacobi": partial(_sv_svd_algorithm, name="JACOBI"),
    "gesvd": partial(_sv_svd_algorithm, name="QR"),
    "qr": _sv_qr,
    "gram64": _sv_gram64,
    "gram64t": partial(_sv_gram64, tridiagonal=True),
    "gram32": partial(_sv_gram, dtype=jnp.float32),
}
_NEEDS_ALGORITHM = {"jacobi": "JACOBI", "gesvd": "QR"}
_GPU_ONLY = {"jacobi": "JAX's Jacobi SVD (gesvdj) runs on GPU only"}


def check_method(method: Optional[str]) -> str:
    """The method name (None -> DEFAULT_RANK_METHOD, read at call time); UserError if unknown."""
    method = DEFAULT_RANK_METHOD if method is None else method
    if method not in RANK_METHODS:
        raise UserError(f"unknown rank method {method!r}; choose one of: {', '.join(RANK_METHODS)}")
    return method


def method_unavailable(method: Optional[str], platform: Optional[str] = None) -> Optional[str]:
    """Why `method` cannot run with the installed JAX on `platform` (default: the default
    backend), or None when it can."""
    method = check_method(method)
    if method in _NEEDS_ALGORITHM and _svd_algorithm(_NEEDS_ALGORITHM[method]) is None:
        return (f"this JAX ({jax.__version__}) has no lax.linalg.SvdAlgorithm."
                f"{_NEEDS_ALGORITHM[method]}")
    if method in _GPU_ONLY and (platform or jax.default_backend()) not in ("gpu", "cuda", "rocm"):
        return _GPU_ONLY[method]
    return None


def singular_values(x: jax.Array, method: Optional[str] = None) -> jax.Array:
    """Singular values [..., min(m, n)] (descending, fp32) of each matrix of x [..., m, n].

    On the CPU backend the matrices go one at a time (`lax.map`): jaxlib's batched LAPACK
    kernels split a batch over the XLA intra-op thread pool and block on it, which deadlocked
    (seen with jaxlib 0.10.2 on a 2-core machine, shapes computed concurrently); a batch of one
    runs inline. Same values; GPU batches are unchanged.
    """
    fn = RANK_METHODS[check_method(method)]
    if x.shape[-2] > x.shape[-1]:
        x = jnp.swapaxes(x, -1, -2)                                   # σ(A) = σ(Aᵀ)
    x = x.astype(jnp.float32)
    if x.ndim > 2 and jax.default_backend() == "cpu":
        flat = x.reshape((-1,) + x.shape[-2:])
        return lax.map(fn, flat).reshape(x.shape[:-1])
    return fn(x)


# ---------------------------------------------------------------------------- statistics


def spectrum_stats(x: jax.Array, method: Optional[str] = None) -> Dict[str, jax.Array]:
    """Rank statistics of each matrix in x [..., m, n] (fp32), each output shaped [...].

    Keys: rank, effective, stable (and *_frac of min(m, n)), fro (‖x‖_F). `method`: how the
    singular values are computed (None: DEFAULT_RANK_METHOD; error bounds in the module docstring).
    """
    x = x.astype(jnp.float32)
    m, n = x.shape[-2], x.shape[-1]
    scale = jnp.max(jnp.abs(x), axis=(-2, -1))                       # [...]
    safe = jnp.where(scale > 0, scale, 1.0)
    xn = x / safe[..., None, None]
    s = singular_values(xn, method)                                    # [..., k], descending
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


def tree_delta_stats(w0: Dict[str, jax.Array], wt: Dict[str, jax.Array], tau, large_update_factor,
                     method: Optional[str] = None):
    """All statistics of ΔW = wt - w0 for dicts of leaves, in one jitted program.

    Returns ({path: {stat: [L]}} for leaves with ndim >= 2 (leading axes flattened to L; stats of
    `spectrum_stats` plus density (%) and large_frac), {path: int32 count of |ΔW| > tau}).
    One compile per (tree layout, method); tau and the factor are traced. `method`: a
    RANK_METHODS key, None = DEFAULT_RANK_METHOD.
    """
    return _tree_delta_stats(w0, wt, tau, large_update_factor, method=check_method(method))


@partial(jax.jit, static_argnames=("method",))
def _tree_delta_stats(w0, wt, tau, large_update_factor, *, method: str):
    n_upd, groups = {}, {}
    for k in w0:
        d = wt[k].astype(jnp.float32) - w0[k].astype(jnp.float32)
        n_upd[k] = jnp.sum(jnp.abs(d) > tau, dtype=jnp.int32)          # a leaf has < 2^31 entries
        if d.ndim < 2:
            continue
        d = d.reshape((-1,) + d.shape[-2:])                          # [L, m, n]
        if d.shape[1] > d.shape[2]:
            d = jnp.swapaxes(d, 1, 2)           # σ(A) = σ(Aᵀ): share one call per shape
        groups.setdefault(d.shape[1:], []).append((k, d))
    out = {}
    for members in groups.values():             # one batched call per distinct matrix shape
        x = jnp.concatenate([d for _, d in members]) if len(members) > 1 else members[0][1]
        stats = spectrum_stats(x, method)
        stats["density"], stats["large_frac"] = _entry_stats(x, tau, large_update_factor)
        start = 0
        for k, d in members:
            out[k] = {name: v[start:start + d.shape[0]] for name, v in stats.items()}
            start += d.shape[0]
    return out, n_upd


def layer_rank_stats(params_t, params_0, *, tau: float, include_regex: Optional[str] = None,
                     large_update_factor: float = 3.0,
                     method: Optional[str] = None) -> Dict[str, float]:
    """Flat metrics of ΔW = params_t - params_0 for every tracked matrix, for training logs.

    Keys `rank/<name>/<stat>` with name `layers.<l>.<module>` (stacked kernels) or `<module>`
    (e.g. `lm_head`), stat in rank, rank_frac, effective, effective_frac, stable, stable_frac, fro,
    density (% of entries with |ΔW| > tau), large_frac (fraction of entries with
    |ΔW| > large_update_factor · mean|ΔW| of that matrix); plus `rank/global/density` (% of all
    tracked weights with |ΔW| > tau). One jitted call (recompiles only if the tree changes;
    tau and the factor are traced). 1-D tracked leaves count in the global density only.
    `method`: singular-value method (None = DEFAULT_RANK_METHOD; the PPO trainer passes none).
    """
    sel_t = deltas.select_tracked(params_t, include_regex)
    sel_0 = {k: tree_flat_get(params_0, k) for k in sel_t}
    deltas.check_same_layout(sel_t, sel_0, "params_t", "params_0")
    stats, n_upd = jax.device_get(tree_delta_stats(sel_0, sel_t, jnp.float32(tau),
                                                   jnp.float32(large_update_factor), method))
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
