"""LoRA as a transform of the parameter tree (base frozen, adapters in their own tree).

For a target kernel W [in, out] (stacked: [L, in, out]) the adapter is A [.., in, r], B [.., r, out]:

    y = x W + (alpha / r) * dropout(x) A B            (A ~ N(0, init_std^2), B = 0 at init)

Two equivalent ways to run it (equal up to float rounding when dropout = 0; tested):
  * merged   `merge(params, adapters, alpha, rank)`: W' = W + (alpha/r) A B, then the ordinary
             forward. Used by the sampler (`params_fn=merge_fn(alpha, rank)`) and for export.
  * unmerged `lora_forward(...)`: the decoder runs with the base kernels and a Flax method
             interceptor adds (alpha/r) dropout(x) A B to the output of every targeted `nn.Dense`
             (the adapter leaves ride along inside the module's params, so `nn.scan` slices them
             per layer). Used for the training loss: it is the only form that can apply input
             dropout, it keeps the delta exact when the base is bf16 (a merged bf16 kernel rounds
             small deltas away), and the backward never forms a full-size dW.

Dropout is PEFT's: an elementwise mask on the adapter's input x (per token, per feature), drawn
from the key passed to `lora_forward`, independent per layer and per target module.

Adapters mirror the params paths: `adapters['layers']['attn']['q_proj'] = {'lora_a', 'lora_b'}`.
Only kernels under `layers/` can be targets (the LM head is read outside the modules by
`lm_logits`); a targets regex that matches no such kernel is an error.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_sparse import tree as tree_lib
from jaxrl_sparse.errors import UserError

DEFAULT_TARGETS = "q_proj,v_proj"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
A, B, KEY = "lora_a", "lora_b", "lora_key"


def targets_regex(targets: str) -> str:
    """`"q_proj,v_proj"` (module names) -> `layers/.*/(q_proj|v_proj)/kernel$`; other strings are
    taken as a regex over `/`-joined param paths (e.g. `attn/(q|k|v|o)_proj`)."""
    t = targets.strip()
    names = [n.strip() for n in t.split(",") if n.strip()]
    if names and all(re.fullmatch(r"\w+", n) for n in names):
        bad = [n for n in names if n not in MODULES]
        if bad:
            raise UserError(f"unknown LoRA target module(s) {bad}; choose from {', '.join(MODULES)} "
                            "or pass a regex over parameter paths")
        return r"^layers/.*/(" + "|".join(names) + r")/kernel$"
    return t


def target_paths(params, targets: str) -> Dict[str, tuple]:
    """{kernel path: shape} of the LoRA targets (kernels under `layers/` matching `targets`)."""
    regex = targets_regex(targets)
    try:
        hits = tree_lib.select(params, regex, what="LoRA targets")
    except ValueError as e:
        raise UserError(f"--lora_targets={targets!r}: {e}") from None
    chosen = {p: tuple(x.shape) for p, x in hits.items()
              if p.startswith("layers/") and p.endswith("/kernel")}
    if not chosen:
        raise UserError(f"--lora_targets={targets!r} matches {sorted(hits)[:4]} but no kernel under "
                        "layers/ (LoRA adapts the q/k/v/o/gate/up/down projection kernels)")
    return chosen


def init_lora(params, targets: str, rank: int, key, *, dtype=jnp.float32,
              init_std: Optional[float] = None) -> Dict[str, Any]:
    """Adapters for every target kernel: A [L, in, r] ~ N(0, init_std^2), B [L, r, out] = 0.

    init_std defaults to 1/sqrt(in) (the variance of PEFT's kaiming-uniform A, up to a factor 3).
    Key for target i is `fold_in(key, i)` in sorted path order, so adding a target does not
    change the others. Works on arrays or ShapeDtypeStructs (shapes only are read).
    """
    if rank < 1:
        raise UserError(f"--lora_rank={rank} must be >= 1")
    flat = {}
    for i, (path, shape) in enumerate(sorted(target_paths(params, targets).items())):
        *lead, d_in, d_out = shape
        std = init_std if init_std is not None else d_in ** -0.5
        base = path[: -len("/kernel")]
        flat[f"{base}/{A}"] = std * jax.random.normal(jax.random.fold_in(key, i),
                                                      (*lead, d_in, rank), dtype)
        flat[f"{base}/{B}"] = jnp.zeros((*lead, rank, d_out), dtype)
    return tree_lib.unflatten(flat)


def scale(alpha: float, rank: int) -> float:
    return float(alpha) / float(rank)


def _pairs(adapters) -> Dict[str, tuple]:
    """{module path: (A, B)} from an adapters tree."""
    flat = tree_lib.flatten(adapters)
    out = {}
    for p, x in flat.items():
        mod, leaf = p.rsplit("/", 1)
        if leaf == A:
            out[mod] = (x, flat[f"{mod}/{B}"])
    return out


def adapted_kernels(adapters) -> list:
    """Sorted `/`-joined paths of the base kernels the adapters modify."""
    return sorted(f"{m}/kernel" for m in _pairs(adapters))


def deltas(adapters, alpha: float, rank: int) -> Dict[str, jax.Array]:
    """{kernel path: (alpha/r) A @ B} in float32 (batched over the layer axis)."""
    s = scale(alpha, rank)
    return {f"{m}/kernel": s * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
            for m, (a, b) in _pairs(adapters).items()}


def merge(params, adapters, alpha: float, rank: int, *, mask=None):
    """params with W' = W + (alpha/r) A B on every adapted kernel (computed in f32, cast to W's dtype).

    mask: optional boolean tree over params (`analysis.mask.load_update_mask`): the delta is
    multiplied by it, so only the subnetwork moves (the masked delta is no longer low-rank).
    """
    d = deltas(adapters, alpha, rank)
    flat = tree_lib.flatten(params)
    mflat = tree_lib.flatten(mask) if mask is not None else {}
    for p, dw in d.items():
        if p not in flat:
            raise UserError(f"adapter for {p!r} has no base kernel; the adapters were trained on "
                            "another model")
        w = flat[p]
        if tuple(w.shape) != tuple(dw.shape):
            raise UserError(f"adapter for {p} gives shape {tuple(dw.shape)}, the model's kernel is "
                            f"{tuple(w.shape)}; the adapters were trained on another model")
        if p in mflat:
            dw = dw * jnp.asarray(mflat[p], dw.dtype)
        flat[p] = (w.astype(jnp.float32) + dw).astype(w.dtype)
    return tree_lib.unflatten(flat)


@functools.lru_cache(maxsize=None)
def merge_fn(alpha: float, rank: int) -> Callable[[Dict[str, Any]], Any]:
    """`fn({'base', 'lora'[, 'mask']}) -> merged params` for `generate(params_fn=...)`.

    One function object per (alpha, rank) so the sampler's compile cache is reused across steps.
    """
    def fn(p):
        return merge(p["base"], p["lora"], alpha, rank, mask=p.get("mask"))
    return fn


def _inject(params, adapters, key=None):
    """params with each adapter's A/B (and a per-layer dropout key) added beside its kernel."""
    flat = tree_lib.flatten(params)
    for i, (mod, (a, b)) in enumerate(sorted(_pairs(adapters).items())):
        if f"{mod}/kernel" not in flat:
            raise UserError(f"adapter {mod!r} has no base kernel; trained on another model?")
        flat[f"{mod}/{A}"], flat[f"{mod}/{B}"] = a, b
        if key is not None:
            lead = a.shape[:-2]
            n = 1
            for s in lead:
                n *= s
            ks = jax.random.split(jax.random.fold_in(key, i), max(n, 1))
            flat[f"{mod}/{KEY}"] = jax.random.key_data(ks).reshape(*lead, -1)
    return tree_lib.unflatten(flat)


def _interceptor(s: float, dropout: float):
    def icpt(next_fun, args, kwargs, context):
        m = context.module
        if not (isinstance(m, nn.Dense) and context.method_name == "__call__"
                and m.has_variable("params", A)):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        a, b = m.get_variable("params", A), m.get_variable("params", B)
        if dropout > 0.0 and m.has_variable("params", KEY):
            k = jax.random.wrap_key_data(m.get_variable("params", KEY))
            keep = jax.random.bernoulli(k, 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros((), x.dtype)).astype(x.dtype)
        dt = y.dtype
        h = jnp.matmul(x, a.astype(dt))                                  # [.., r]
        return y + (s * jnp.matmul(h, b.astype(dt))).astype(dt)
    return icpt


def lora_forward(params, adapters, cfg, tokens, attention_mask=None, *, alpha: float, rank: int,
                 dropout: float = 0.0, key=None, **forward_kw):
    """Unmerged LoRA forward: `decoder.forward` with base kernels + (alpha/r) dropout(x) A B added
    at every adapted `nn.Dense`. `key` is needed when dropout > 0 (the masks derive from it)."""
    from jaxrl_sparse.models.decoder import forward
    if dropout > 0.0 and key is None:
        raise ValueError("lora_forward: dropout > 0 needs a key")
    p = _inject(params, adapters, key if dropout > 0.0 else None)
    with nn.intercept_methods(_interceptor(scale(alpha, rank), float(dropout))):
        return forward(p, cfg, tokens, attention_mask, **forward_kw)


def num_params(adapters) -> int:
    return tree_lib.count(adapters)
