"""The final update mask: train only the subnetwork a previous run changed (paper §4).

File format (`.npz`, no pickles): for every parameter path `p` (`/`-joined) of the params tree,
`mask/<p>` = `np.packbits` of the flattened boolean mask and `shape/<p>` = its shape (int64);
`meta` = a JSON string (tau, include regex, source, counts).

Convention: the mask has a leaf for every parameter. Tracked leaves are True where
|W_final - W_0| > tau; untracked leaves (norms, biases, embeddings under the default regex) are
all False, i.e. frozen — `untracked=True` makes them all True (train them fully) instead.

Trainers (`--update_mask=PATH`):

    mask = load_update_mask(PATH, params)            # numpy bool tree, same structure as params
    updates = apply_update_mask(updates, mask)       # inside the jitted step, mask passed as arg

Apply it to the optimizer's *updates* (after `tx.update`), not only to the gradients: decoupled
weight decay (AdamW) would otherwise still move masked weights.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse import tree as tree_lib
from jaxrl_sparse.analysis import deltas
from jaxrl_sparse.errors import UserError


@jax.jit
def _tau_masks(w0: Dict[str, jax.Array], wf: Dict[str, jax.Array], tau):
    """{path: |wf - w0| > tau} for dicts of leaves (one program for all leaves)."""
    return {k: jnp.abs(wf[k].astype(jnp.float32) - w0[k].astype(jnp.float32)) > tau for k in w0}


def update_mask(params_0, params_final, *, tau: float, include: Optional[str] = None,
                untracked: bool = False, shapes: Optional[Dict[str, tuple]] = None) -> Dict[str, Any]:
    """Boolean tree (numpy) over the params structure; tracked leaves = |W_final - W_0| > tau.

    params_0 / params_final need only hold the tracked leaves when `shapes` ({path: shape} of every
    parameter) is given; otherwise `params_final`'s structure defines the mask's structure.
    """
    sel_f = deltas.select_tracked(params_final, include)
    if shapes is None:
        shapes = {p: tuple(x.shape) for p, x in tree_lib.flatten(params_final).items()}
    from jaxrl_sparse.parallel import to_host   # multi-host: arrays split over processes
    tracked = to_host(_tau_masks({p: _flat_get(params_0, p) for p in sel_f}, sel_f,
                                        jnp.float32(tau)))
    flat = {}
    for path, shape in shapes.items():
        if path in tracked:
            flat[path] = np.asarray(tracked[path])
        else:
            flat[path] = np.full(shape, bool(untracked))
    return tree_lib.unflatten(flat)


def _flat_get(tree, path):
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def save_update_mask(path: str, mask, *, meta: Optional[dict] = None) -> str:
    """Writes a boolean tree as a packed `.npz` (see module doc). Returns the path written."""
    if not path.endswith(".npz"):
        path += ".npz"
    flat = tree_lib.flatten(mask)
    arrays = {}
    n_true = 0
    for p, m in flat.items():
        m = np.asarray(m, dtype=bool)
        n_true += int(m.sum())
        arrays[f"mask/{p}"] = np.packbits(m.reshape(-1))
        arrays[f"shape/{p}"] = np.asarray(m.shape, np.int64)
    meta = dict(meta or {}, n_true=n_true, n_total=sum(int(np.prod(np.shape(m))) for m in flat.values()))
    arrays["meta"] = np.asarray(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)                          # readers never see a half-written mask
    return path


def read_mask_meta(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["meta"]))


def load_update_mask(path: str, params_like) -> Dict[str, Any]:
    """Boolean numpy tree with `params_like`'s structure; UserError on any path/shape mismatch.

    params_like: the params tree (arrays or ShapeDtypeStructs); every leaf must be in the file.
    """
    if not os.path.isfile(path):
        raise UserError(f"update mask {path!r} does not exist; write one with "
                        "`python -m launch.analyze --ckpt_dir=... --mask_out=PATH`")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"update mask {path!r} is not a readable .npz ({e})") from e
    with f:
        names = set(f.files)
        flat = {}
        for p, leaf in tree_lib.flatten(params_like).items():
            if f"mask/{p}" not in names:
                raise UserError(f"update mask {path!r} has no entry for parameter {p!r}; it was "
                                "written for another model")
            shape = tuple(int(s) for s in f[f"shape/{p}"])
            if shape != tuple(leaf.shape):
                raise UserError(f"update mask {path!r}: {p} has shape {shape}, the model's is "
                                f"{tuple(leaf.shape)}; it was written for another model")
            n = int(np.prod(shape))
            flat[p] = np.unpackbits(f[f"mask/{p}"], count=n).astype(bool).reshape(shape)
    return tree_lib.unflatten(flat)


def apply_update_mask(updates, mask):
    """`updates` with entries where `mask` is False set to 0 (same tree structure; jittable)."""
    return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, mask)
