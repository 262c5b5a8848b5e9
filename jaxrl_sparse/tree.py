"""Parameter-tree helpers: `/`-joined paths and regex selection.

One helper selects parameters everywhere (LoRA targets, `--np_include`, freezing, analysis
subsets). Selecting nothing is an error, never a silent no-op.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, Tuple

import jax


def path_str(path: Tuple[Any, ...]) -> str:
    """Turns a `jax.tree_util` key path into `a/b/c`."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten(tree) -> Dict[str, Any]:
    """`{path: leaf}` in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): x for p, x in leaves}


def unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of `flatten` for nested dicts."""
    out: Dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def select(tree, pattern: str | Iterable[str], *, what: str = "parameters") -> Dict[str, Any]:
    """Leaves whose path matches `pattern` (a regex searched in the path, or a list of regexes).

    Raises ValueError naming the pattern and some available paths when nothing matches.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    regs = [re.compile(p) for p in patterns]
    flat = flatten(tree)
    hits = {p: x for p, x in flat.items() if any(r.search(p) for r in regs)}
    if not hits:
        sample = ", ".join(list(flat)[:8])
        raise ValueError(
            f"no {what} match {patterns!r}; available paths include: {sample} (fix the regex)")
    return hits


def mask(tree, pattern: str | Iterable[str], *, what: str = "parameters"):
    """Boolean tree: True where the leaf path matches `pattern` (at least one must match)."""
    chosen = select(tree, pattern, what=what)
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p) in chosen, tree)


def map_selected(fn: Callable[[str, Any], Any], tree, pattern: str | Iterable[str]):
    """Applies `fn(path, leaf)` to matching leaves, keeps the others."""
    chosen = select(tree, pattern)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(path_str(p), x) if path_str(p) in chosen else x, tree)


def count(tree) -> int:
    """Number of scalar parameters (works on ShapeDtypeStructs too)."""
    import math
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
