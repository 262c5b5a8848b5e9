"""Orbax checkpoints: step-numbered, atomic, readable without the trainer's code.

Layout (Orbax's own, one `CheckpointManager` directory):

    ckpt_dir/<step>/state/...        the pytree (Orbax PyTree item: OCDBT + tensorstore)
    ckpt_dir/<step>/resume/...       optional: what only continuing the run needs (optimizer state)
    ckpt_dir/<step>/metadata/metadata  plain JSON (model config, trainer name, ...)

Orbax writes a step into `ckpt_dir/<step>.orbax-checkpoint-tmp-<n>` and renames it when complete
(on object stores it writes a commit marker instead), so a half-written step is never listed.
Every process calls `save`; Orbax coordinates multi-process writes (never gate it on process 0).

Tree convention: a top-level dict whose key `'params'` holds the model tree; trainers may add other
keys. `restore_params` reads only `'params'` (Orbax partial restore), which is all the analyzer needs.

The `resume` item (`save(..., resume=tree)`, read back with `restore_resume`) holds the optimizer
state: Adam's two moments are twice the weights, and a run that checkpoints every 20 of 600
updates would otherwise store them 31 times. Only the newest `keep_resume` steps keep it (the
item's folder of older steps is removed once a newer step is committed); their weights stay.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_sparse.errors import UserError

_STATE = "state"
_RESUME = "resume"
_METADATA = "metadata"


class _QuietReadOnly(logging.Filter):
    """Drops Orbax's per-manager warnings about read-only managers (we open one per read)."""

    def filter(self, record):
        msg = record.getMessage()
        return not ("read_only=True, setting save_interval_steps" in msg
                    or "Given directory is read only" in msg)


logging.getLogger("absl").addFilter(_QuietReadOnly())


def _manager(ckpt_dir: str, *, read_only: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=not read_only, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        os.path.abspath(ckpt_dir), options=options,
        item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                       _RESUME: ocp.PyTreeCheckpointHandler(),
                       _METADATA: ocp.JsonCheckpointHandler()})


def _jsonable(metadata: Optional[dict]) -> dict:
    """Round-trips through JSON so tuples, numpy scalars and dataclass reprs become plain JSON."""
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)
    return json.loads(json.dumps(dict(metadata or {}), default=default))


def save(ckpt_dir: str, step: int, tree: Any, *, metadata: Optional[dict] = None,
         overwrite: bool = False, resume: Any = None, keep_resume: int = 1) -> str:
    """Writes `tree` (nested dicts of jax/numpy arrays, any dtype incl. bf16) as step `step`.

    resume: an optional second tree that only continuing the run needs (optimizer state); after
      this step is committed, steps older than the newest `keep_resume` ones that hold a resume
      item lose it (0 keeps every one).
    Blocks until the step is committed. Returns the step's directory. `overwrite=True` replaces an
    existing step; otherwise an existing step is a `UserError`.
    """
    step = int(step)
    items = {_STATE: ocp.args.PyTreeSave(tree), _METADATA: ocp.args.JsonSave(_jsonable(metadata))}
    if resume is not None:
        items[_RESUME] = ocp.args.PyTreeSave(resume)
    with _manager(ckpt_dir, read_only=False) as mngr:
        if step in mngr.all_steps():
            if not overwrite:
                raise UserError(f"checkpoint step {step} already exists in {ckpt_dir}; "
                                "use another step, a fresh --ckpt_dir, or overwrite=True")
            mngr.delete(step)
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
        steps = sorted(int(s) for s in mngr.all_steps())
    if resume is not None and keep_resume > 0 and jax.process_index() == 0:
        with_resume = [s for s in steps if has_resume(ckpt_dir, s)]
        for old in with_resume[:-keep_resume]:
            if old != step:
                shutil.rmtree(_resume_dir(ckpt_dir, old), ignore_errors=True)
    return os.path.join(os.path.abspath(ckpt_dir), str(step))


def check_keep_resume(n: int, flag: str) -> None:
    """`keep_resume` values a user may pass: 0 (every step keeps it) or a positive count."""
    if n < 0:
        raise UserError(f"{flag} must be >= 0 (0 keeps the optimizer state in every checkpoint), got {n}")


def tree_nbytes(tree: Any) -> int:
    """Bytes of a pytree's arrays (what a checkpoint of it takes, before any compression)."""
    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def check_disk(ckpt_dir: str, n_steps: int, tree: Any, resume: Any = None, keep_resume: int = 1,
               extra_bytes: int = 0) -> Optional[str]:
    """A one-line warning (also printed to stderr) when `n_steps` more checkpoints of `tree` (plus
    `resume`, kept in the newest `keep_resume`, 0 = all) and `extra_bytes` (e.g. a final export)
    would not fit on the filesystem holding `ckpt_dir`; None when they fit. A warning, not an
    error: the estimate ignores compression, and space may be freed while the run goes on."""
    if n_steps <= 0 or jax.process_index() != 0:
        return None
    kept = n_steps if keep_resume == 0 else min(keep_resume, n_steps)
    need = n_steps * tree_nbytes(tree) + (kept * tree_nbytes(resume) if resume is not None else 0) + extra_bytes
    path = os.path.abspath(ckpt_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if need <= free:
        return None
    msg = (f"warning: the run's {n_steps} checkpoints need about {need / 2**30:.1f} GB and {path} has "
           f"{free / 2**30:.1f} GB free; raise --save_ckpt_every (ES: --save_every), keep the optimizer state "
           "in fewer checkpoints (--keep_opt_state) or free some space")
    print(msg, file=sys.stderr)
    return msg


def _resume_dir(ckpt_dir: str, step: int) -> str:
    return os.path.join(os.path.abspath(ckpt_dir), str(step), _RESUME)


def has_resume(ckpt_dir: str, step: int) -> bool:
    """Whether step `step` still holds its resume item (see `save`'s `keep_resume`)."""
    return os.path.isdir(_resume_dir(ckpt_dir, step))


def all_steps(ckpt_dir: str) -> List[int]:
    """Committed steps in `ckpt_dir`, ascending ([] when the directory is absent or empty).

    Multi-process: every process must call it; process 0 decides whether the directory exists (and
    the others follow), since Orbax's managers synchronise and all processes must open one or none."""
    exists = os.path.isdir(ckpt_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if not exists:
        return []
    with _manager(ckpt_dir, read_only=True) as mngr:
        return sorted(int(s) for s in mngr.all_steps())


def latest_step(ckpt_dir: str) -> Optional[int]:
    steps = all_steps(ckpt_dir)
    return steps[-1] if steps else None


def _resolve_step(ckpt_dir: str, step: Optional[int]) -> int:
    steps = all_steps(ckpt_dir)
    if not steps:
        raise UserError(f"no checkpoints in {ckpt_dir!r}; pass the directory a trainer wrote "
                        "(it holds step-numbered subfolders)")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise UserError(f"checkpoint step {step} is not in {ckpt_dir!r}; available steps: "
                        f"{_short(steps)}")
    return int(step)


def _short(steps: Sequence[int]) -> str:
    s = list(steps)
    return ", ".join(map(str, s)) if len(s) <= 12 else (
        ", ".join(map(str, s[:6])) + ", ..., " + ", ".join(map(str, s[-3:])))


def _host_restore_args(meta_tree):
    """RestoreArgs that give numpy arrays (portable across device topologies) for array leaves."""
    def one(m):
        if isinstance(m, ocp.metadata.ArrayMetadata):
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.RestoreArgs()
    return jax.tree.map(one, meta_tree, is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata))


def tree_metadata(ckpt_dir: str, step: Optional[int] = None) -> Any:
    """The saved tree's structure with Orbax `ArrayMetadata` leaves (shape, dtype), no data read."""
    step = _resolve_step(ckpt_dir, step)
    try:
        with _manager(ckpt_dir, read_only=True) as mngr:
            meta = mngr.item_metadata(step)[_STATE]
    except Exception as e:  # corrupt or partial step folder
        raise _corrupt(ckpt_dir, step, e) from e
    if meta is None:
        raise _corrupt(ckpt_dir, step, "no readable 'state' item")
    return meta.tree if hasattr(meta, "tree") else meta


def _corrupt(ckpt_dir, step, why) -> UserError:
    why = str(why).strip().splitlines()[0].split(" [tensorstore_spec")[0][:300] if str(why).strip() \
        else type(why).__name__
    return UserError(f"checkpoint step {step} in {ckpt_dir!r} cannot be read ({why}); it is "
                     "missing files or corrupt: delete that step folder or pick another step")


def _subtree(meta: Any, keys: Sequence[str], where: str) -> Dict[str, Any]:
    """The part of a nested-dict tree under the `/`-joined `keys` (top-level keys or deeper paths)."""
    out: Dict[str, Any] = {}
    for key in keys:
        node, dst = meta, out
        parts = key.split("/")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                have = list(node) if isinstance(node, dict) else type(node).__name__
                raise UserError(f"{where} has no '{'/'.join(parts[:i + 1])}' (keys there: {have}); "
                                "was it written by jaxrl_sparse.checkpoint.save with a "
                                "{'params': ...} tree?")
            node = node[part]
            if i < len(parts) - 1:
                dst = dst.setdefault(part, {})
        dst[parts[-1]] = node
    return out


def restore(ckpt_dir: str, step: Optional[int] = None, target: Any = None, *,
            keys: Optional[Sequence[str]] = None) -> Any:
    """Reads a step (default: latest).

    target: None -> numpy arrays (bf16 stays bf16) for the whole tree, or only the parts named by
      `keys` when given (top-level keys like `'params'` or `/`-joined paths like
      `'params/lm_head/kernel'`; nothing else is read). Otherwise an abstract tree (`jax.ShapeDtypeStruct`s with `.sharding`,
      e.g. from `jax.eval_shape` + shardings) or a tree of arrays to match; it may be a subset of
      the saved tree (e.g. `{'params': ...}`), the rest is not read (Orbax partial restore).
    """
    step = _resolve_step(ckpt_dir, step)
    if target is None:
        meta = tree_metadata(ckpt_dir, step)
        if keys is not None:
            meta = _subtree(meta, keys, f"checkpoint step {step} in {ckpt_dir!r}")
        args = ocp.args.PyTreeRestore(item=meta, restore_args=_host_restore_args(meta),
                                      partial_restore=keys is not None)
    else:
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
    return _restore_item(ckpt_dir, step, _STATE, args)


def _restore_item(ckpt_dir: str, step: int, item: str, args) -> Any:
    try:
        with _manager(ckpt_dir, read_only=True) as mngr:
            return mngr.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except UserError:
        raise
    except Exception as e:
        raise _corrupt(ckpt_dir, step, e) from e


def restore_resume(ckpt_dir: str, step: int, target: Any) -> Any:
    """The resume item of `step` (see `save`), matched to `target` (an abstract or array tree)."""
    step = _resolve_step(ckpt_dir, step)
    if not has_resume(ckpt_dir, step):
        raise UserError(f"checkpoint step {step} in {ckpt_dir!r} holds no optimizer state (only the newest "
                        "checkpoints keep it, see --keep_opt_state), so the run cannot continue from it; "
                        "resume from the latest step or start in a fresh output folder (--workdir, ES: --visualization_dir)")
    try:
        with _manager(ckpt_dir, read_only=True) as mngr:
            meta = mngr.item_metadata(step)[_RESUME]
        saved = set(meta.tree if hasattr(meta, "tree") else meta)
    except Exception as e:  # corrupt or partial resume folder
        raise _corrupt(ckpt_dir, step, e) from e
    if set(target) - saved:  # Orbax's partial restore would hand back the target's own (fresh) arrays
        raise UserError(f"checkpoint step {step} in {ckpt_dir!r} holds optimizer state {sorted(saved)}, the run "
                        f"needs {sorted(target)}; resume with the flags the run started with (e.g. --optimizer) "
                        "or start in a fresh output folder (--workdir, ES: --visualization_dir)")
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    return _restore_item(ckpt_dir, step, _RESUME, args)


def restore_params(ckpt_dir: str, step: Optional[int] = None, target: Any = None, *,
                   paths: Optional[Sequence[str]] = None) -> Any:
    """Only the `'params'` subtree of a step; `target` is the abstract/array params tree or None.

    paths: with `target=None`, read only these `/`-joined params paths (e.g. the analyzer's tracked
      kernels); the result is the nested dict holding just them.
    """
    if target is None:
        keys = ("params",) if paths is None else tuple("params/" + p for p in paths)
        return restore(ckpt_dir, step, keys=keys)["params"]
    return restore(ckpt_dir, step, {"params": target})["params"]


def read_metadata(ckpt_dir: str, step: Optional[int] = None) -> Dict[str, Any]:
    """The JSON metadata saved with a step (`{}` when none was given)."""
    step = _resolve_step(ckpt_dir, step)
    path = os.path.join(ckpt_dir, str(step), _METADATA, "metadata")
    try:
        with open(path) as f:  # plain JSON written by Orbax's JsonCheckpointHandler
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise _corrupt(ckpt_dir, step, e) from e
