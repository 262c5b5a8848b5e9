"""Parameter shapes without allocating (`jax.eval_shape`), grouped and named for people.

Used by `python -m launch.weight_shapes` and by tests that check full-size parameter counts.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import jax
import numpy as np

from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.convert import block_table, hf_name_of, top_table
from jaxrl_sparse.tree import flatten

MODULES = ("embed", "attention", "mlp", "norms", "lm_head")


def param_shapes(cfg: ModelConfig) -> Dict[str, Any]:
    """Parameter tree of ShapeDtypeStructs at the config's real shapes (nothing is allocated)."""
    from jaxrl_sparse.models.decoder import init_params
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))


def module_of(path: str) -> str:
    """Which group a parameter path counts towards (one of MODULES)."""
    if "norm" in path.split("/")[-2]:
        return "norms"
    if path.startswith(("embed/", "pos_embed/")):
        return "embed"
    if path.startswith("lm_head/"):
        return "lm_head"
    if path.startswith("layers/attn/"):
        return "attention"
    if path.startswith("layers/mlp/"):
        return "mlp"
    return "other"


def _transposed(cfg: ModelConfig, path: str) -> bool:
    for p, _, tr in top_table(cfg):
        if p == path:
            return tr
    for p, _, tr in block_table(cfg):
        if "layers/" + p == path:
            return tr
    return False


def weight_rows(cfg: ModelConfig, tree, hf_names: bool = False) -> List[Tuple[str, Tuple[int, ...], str, int, str]]:
    """(name, shape, dtype, count, note) per parameter; with hf_names, HF names and HF shapes
    (per layer, `[out, in]` for Linear weights), the stacked layer count in the note."""
    rows = []
    for path, x in flatten(tree).items():
        shape, n = tuple(int(d) for d in x.shape), math.prod(x.shape)
        dt = str(np.dtype(x.dtype)) if x.dtype != jax.numpy.bfloat16 else "bfloat16"
        hf = hf_name_of(cfg, path)
        stacked = path.startswith("layers/")
        if hf_names:
            s = shape[1:] if stacked else shape
            if _transposed(cfg, path):
                s = s[::-1]
            rows.append((hf, s, dt, n, f"x {cfg.num_layers} layers" if stacked else ""))
        else:
            rows.append((path, shape, dt, n, hf + (f" (x {cfg.num_layers})" if stacked else "")))
    return rows


def module_counts(tree) -> Dict[str, int]:
    counts = {m: 0 for m in MODULES}
    for path, x in flatten(tree).items():
        m = module_of(path)
        counts[m] = counts.get(m, 0) + math.prod(x.shape)
    counts["total"] = sum(v for k, v in counts.items())
    return counts


def format_table(cfg: ModelConfig, tree, *, hf_names: bool = False, title: str = "") -> str:
    """Human-readable table: one row per parameter, then counts per module and the total."""
    rows = weight_rows(cfg, tree, hf_names)
    w = max(len(r[0]) for r in rows)
    ws = max(len(str(list(r[1]))) for r in rows)
    lines = [title] if title else []
    lines.append(f"{'name':<{w}}  {'shape':<{ws}}  {'dtype':<8}  {'count':>13}  " +
                 ("layers" if hf_names else "HF name"))
    for name, shape, dt, n, note in rows:
        lines.append(f"{name:<{w}}  {str(list(shape)):<{ws}}  {dt:<8}  {n:>13,}  {note}")
    lines.append("")
    counts = module_counts(tree)
    for m, n in counts.items():
        if n or m == "total":
            lines.append(f"{m:<10} {n:>15,}")
    return "\n".join(lines)
