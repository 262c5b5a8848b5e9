"""Weight, low-rank weight and node perturbations for evolution strategies (pure functions).

Every perturbation is regenerated from a key, never stored: member n of an iteration uses
`member_key(noise_key, seed_n)` and each parameter leaf folds in its index in the tree's path order.

- Full-rank WP: eps_n = N(0, 1) per selected leaf; the member runs with theta + sigma * eps_n,
  computed inside the jitted generate (`perturbed_params`), so the fp32 master is never mutated.
- Low-rank WP (EGGROLL, "Evolution Strategies at the Hyperscale"): for each selected kernel
  W [in, out] (per layer for stacked kernels) eps_n = A_n B_n^T / sqrt(r), A [in, r], B [out, r].
  All members decode in ONE batch: row b of member n computes
      x (W + sigma A_n B_n^T / sqrt(r)) = x W + sigma (x A_n) B_n^T / sqrt(r)
  via a Flax method interceptor on `nn.Dense` (`lowrank_interceptor`), no decoder change.
- NP: `ActNoise` on the outputs of the selected sites (decoder.py); `np_scales` builds the
  per-layer scales from `--np_include` / `--last_k`, `np_param_regex` the parameters the replay
  update touches.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_sparse import tree as tree_lib
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import Block

# Dense kernels the low-rank hook can perturb (module path -> leaf path '<path>/kernel').
LOWRANK_REGEX = r"^(layers/(attn|mlp)/\w+_proj|lm_head)/kernel$"
NP_SITES = ("head", "attn", "mlp")
# Parameters whose outputs carry node noise, per site (regex over '/'-joined paths).
_NP_PARAM_REGEX = {"attn": r"^layers/attn/o_proj/", "mlp": r"^layers/mlp/down_proj/"}


# ----------------------------------------------------------------------------- keys
def member_key(noise_key, seed):
    """Key of one population member: `fold_in(noise_key, seed)` (seed: int or uint32 scalar)."""
    return jax.random.fold_in(noise_key, seed)


def leaf_paths(params, include: str) -> Tuple[str, ...]:
    """Sorted paths of the leaves matched by `include` (a regex; '' = every leaf)."""
    flat = tree_lib.select(params, include or ".*") if include else tree_lib.flatten(params)
    return tuple(sorted(flat))


def _leaf_key(key, path: str, all_paths: Sequence[str]):
    return jax.random.fold_in(key, all_paths.index(path))


# ----------------------------------------------------------------------------- full-rank WP
def weight_noise(params, key, paths: Sequence[str]) -> Dict[str, jax.Array]:
    """{path: eps} with eps ~ N(0, 1) float32 at the leaf's shape, for the leaves in `paths`.

    Leaf keys are `fold_in(key, i)` with i the leaf's index in the sorted path list of the whole
    tree, so the noise of a leaf does not depend on which other leaves are selected.
    """
    flat = tree_lib.flatten(params)
    order = sorted(flat)
    return {p: jax.random.normal(_leaf_key(key, p, order), flat[p].shape, jnp.float32) for p in paths}


def perturbed_params(params, key, sigma, paths: Sequence[str], dtype=None):
    """theta + sigma * eps(key) on the selected leaves (others unchanged), cast to `dtype`.

    Functional: the fp32 master `params` is never modified, so there is no perturb-and-restore
    drift; the sum is taken in fp32 before the cast to the compute dtype.
    """
    eps = weight_noise(params, key, paths)
    flat = tree_lib.flatten(params)
    out = {}
    for p, x in flat.items():
        y = x.astype(jnp.float32) + sigma * eps[p] if p in eps else x
        out[p] = y.astype(dtype) if dtype is not None and jnp.issubdtype(y.dtype, jnp.floating) else y
    return tree_lib.unflatten(out)


# ----------------------------------------------------------------------------- low-rank WP
def lowrank_paths(params, include: str) -> Tuple[str, ...]:
    """Selected kernels the low-rank hook supports (transformer projections and an untied head)."""
    import re
    chosen = leaf_paths(params, include)
    ok = tuple(p for p in chosen if re.match(LOWRANK_REGEX, p))
    if not ok:
        raise UserError(f"--wp_include={include!r} selects no kernel low-rank WP can perturb "
                        f"(projections matching {LOWRANK_REGEX}); widen the regex")
    return ok


def lowrank_factors(params, key, paths: Sequence[str], rank: int) -> Dict[str, Tuple[jax.Array, jax.Array]]:
    """{path: (A [..., in, r], B [..., out, r])} ~ N(0, 1) for kernels [..., in, out] (one member)."""
    flat = tree_lib.flatten(params)
    order = sorted(flat)
    out = {}
    for p in paths:
        *lead, d_in, d_out = flat[p].shape
        k = _leaf_key(key, p, order)
        out[p] = (jax.random.normal(jax.random.fold_in(k, 0), (*lead, d_in, rank), jnp.float32),
                  jax.random.normal(jax.random.fold_in(k, 1), (*lead, d_out, rank), jnp.float32))
    return out


def lowrank_delta(a, b):
    """eps = A B^T / sqrt(r): a [..., in, r], b [..., out, r] -> [..., in, out]."""
    return jnp.einsum("...ir,...or->...io", a, b) / math.sqrt(a.shape[-1])


def population_lowrank_factors(params, keys, paths: Sequence[str], rank: int):
    """Factors of every member: keys [N] (typed) -> {path: (A [N, ..., in, r], B [N, ..., out, r])}."""
    return jax.vmap(lambda k: lowrank_factors(params, k, paths, rank))(keys)


class _LayerTracker:
    """Remembers the scanned layer index while a `Block` runs (the index is a tracer of that trace)."""

    def __init__(self):
        self.layer = None

    def wrap(self, next_fun, args, kwargs, context) -> Tuple[bool, Any]:
        if isinstance(context.module, Block) and context.method_name == "__call__":
            old, self.layer = self.layer, args[1]
            try:
                return True, next_fun(*args, **kwargs)
            finally:
                self.layer = old
        return False, None


def _dense_path(context) -> Optional[str]:
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
        return "/".join(context.module.path) + "/kernel"
    return None


@contextlib.contextmanager
def lowrank_interceptor(factors, sigma, n_members: int):
    """Within the context, Dense layers with factors add sigma (x A_n) B_n^T / sqrt(r) per member.

    factors: {kernel path: (A [N, (L,) in, r], B [N, (L,) out, r])} (arrays or tracers of the
    current trace), or a zero-argument callable returning it when a Dense runs (lets a `params_fn`
    hand over factors computed inside the jitted program). Batch rows must be member-major: row b belongs to member b // (B / N).
    Must be active while the forward is traced (the jit caches the traced program).
    """
    tracker = _LayerTracker()

    def icpt(next_fun, args, kwargs, context):
        handled, out = tracker.wrap(next_fun, args, kwargs, context)
        if handled:
            return out
        path = _dense_path(context)
        y = next_fun(*args, **kwargs)
        fac = factors() if callable(factors) else factors
        if path is None or path not in fac:
            return y
        a, b = fac[path]
        if a.ndim == 4:  # stacked kernel: pick this layer's factors
            a, b = a[:, tracker.layer], b[:, tracker.layer]
        x = args[0]
        B, T, d_in = x.shape
        xg = x.reshape(n_members, B // n_members, T, d_in)
        dt = y.dtype
        xa = jnp.einsum("nmti,nir->nmtr", xg, a.astype(dt))
        d = jnp.einsum("nmtr,nor->nmto", xa, b.astype(dt)) * jnp.asarray(sigma / math.sqrt(a.shape[-1]), dt)
        return y + d.reshape(y.shape).astype(dt)

    with nn.intercept_methods(icpt):
        yield


# ----------------------------------------------------------------------------- NP
def parse_np_include(include: str) -> Tuple[str, ...]:
    """'mlp' | 'attn' | 'head' | 'all' | comma list -> sorted tuple of sites."""
    parts = [s.strip().lower() for s in (include or "all").split(",") if s.strip()]
    sites = set()
    for s in parts:
        if s == "all":
            sites.update(NP_SITES)
        elif s in NP_SITES:
            sites.add(s)
        else:
            raise UserError(f"--np_include={include!r}: unknown site {s!r}; use head, attn, mlp, all "
                            "(or a comma list)")
    return tuple(s for s in NP_SITES if s in sites)


def np_layer_mask(cfg: ModelConfig, last_k: int) -> jax.Array:
    """[L] bool: layers whose sites are perturbed (all, or only the last K blocks)."""
    if last_k < 0 or last_k > cfg.num_layers:
        raise UserError(f"--last_k={last_k} must be in [0, {cfg.num_layers}] (0 = all blocks)")
    L = cfg.num_layers
    return jnp.arange(L) >= (L - last_k if last_k else 0)


def np_scales(cfg: ModelConfig, include: str, last_k: int, sigma: float):
    """(attn_scale [L], mlp_scale [L], head_scale []) float32 for `ActNoise`."""
    sites = parse_np_include(include)
    lm = np_layer_mask(cfg, last_k).astype(jnp.float32)
    attn = lm * sigma if "attn" in sites else jnp.zeros_like(lm)
    mlp = lm * sigma if "mlp" in sites else jnp.zeros_like(lm)
    head = jnp.float32(sigma if "head" in sites else 0.0)
    return attn, mlp, head


def np_param_regex(cfg: ModelConfig, include: str) -> Tuple[str, ...]:
    """Regexes of the parameters the NP replay updates (stacked: all layers; non-selected get 0)."""
    sites = parse_np_include(include)
    out = [_NP_PARAM_REGEX[s] for s in ("attn", "mlp") if s in sites]
    if "head" in sites:
        out.append(r"^embed/embedding$" if cfg.tie_embeddings else r"^lm_head/kernel$")
    return tuple(out)
