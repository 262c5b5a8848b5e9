"""One device Mesh for every trainer: data parallel + FSDP, multi-host through `jax.distributed`.

    mesh = make_mesh("data:2,fsdp:4")        # axes always ("data", "fsdp"); "" = all devices on data
    state = put(state, param_shardings(state, mesh))      # params / optimizer state: fsdp-sharded
    batch = put_batch(batch, mesh)                        # rows split over data x fsdp
    step = jax.jit(step, in_shardings=(layout.tree, batch_sharding(mesh)), out_shardings=...)

Sharding rules (decided from shapes only, so `jax.eval_shape` trees and real trees agree):
- Parameters and optimizer state (FSDP / ZeRO-3): an array with >= `MIN_SHARD_SIZE` elements is
  split along 'fsdp' on its largest dimension divisible by the fsdp size; the stacked-layer axis 0
  of `layers/...` leaves is skipped (the layer scan slices it every step). Everything else, and
  every array when fsdp = 1, is replicated. XLA all-gathers a layer's weights where they are used
  and reduce-scatters their gradients.
- Batches: axis 0 over ('data', 'fsdp') together. In FSDP every device still computes on its own
  slice of the batch (the weights are what is split, not the work), so a data:2,fsdp:2 mesh runs
  4 batch slices, exactly like data:4; fsdp only changes where parameters live.

Multi-host: `init_distributed` wraps `jax.distributed.initialize` (then `jax.devices()` lists every
process's devices and the mesh spans hosts). Every process runs the same program on the same host
data (all randomness derives from keys, so host batches are identical); `put` uploads only the
shards a process's devices hold, host-side per-row work (decoding, rewards) is split with
`process_rows` and gathered with `allgather_rows`, and only `is_main_process()` writes files.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_sparse.errors import UserError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")   # the batch is split over both axes (see the module docstring)
MIN_SHARD_SIZE = 2 ** 14        # smaller arrays (norm scales, biases, LoRA factors) are replicated


# ----------------------------------------------------------------------------- mesh
def parse_mesh(spec: str, n_devices: Optional[int] = None) -> Dict[str, int]:
    """'data:2,fsdp:2' -> {'data': 2, 'fsdp': 2}; '' = all devices on data; one size may be -1
    (= the devices left). The product must equal the device count (default: all devices)."""
    n = jax.device_count() if n_devices is None else int(n_devices)
    sizes: Dict[str, int] = {}
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        name, sep, val = part.partition(":")
        name = name.strip()
        if name not in AXES:
            raise UserError(f"--mesh={spec!r}: unknown axis {name!r}; axes are {', '.join(AXES)} "
                            "(e.g. --mesh=data:2,fsdp:4)")
        if name in sizes:
            raise UserError(f"--mesh={spec!r}: axis {name!r} given twice")
        try:
            size = int(val) if sep else -1
        except ValueError:
            raise UserError(f"--mesh={spec!r}: size of {name!r} must be an integer, got {val!r}") from None
        if size == 0 or size < -1:
            raise UserError(f"--mesh={spec!r}: size of {name!r} must be positive (or -1 = the rest)")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise UserError(f"--mesh={spec!r}: only one axis may be -1 (the devices left)")
    if not sizes:
        sizes = {"data": -1}
    known = int(np.prod([s for s in sizes.values() if s != -1] or [1]))
    if -1 in sizes.values():
        if n % known:
            raise UserError(f"--mesh={spec!r}: {n} devices are not divisible by {known}")
        sizes = {k: (n // known if v == -1 else v) for k, v in sizes.items()}
    out = {a: sizes.get(a, 1) for a in AXES}
    if int(np.prod(list(out.values()))) != n:
        raise UserError(f"--mesh={spec!r} needs {int(np.prod(list(out.values())))} devices but "
                        f"{n} are visible; make the sizes multiply to {n} (or set CUDA_VISIBLE_DEVICES)")
    return out


def make_mesh(spec: Any = "", devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp') from a spec string (a Mesh passes through).

    Devices in `jax.devices()` order (process-major), fsdp innermost: an fsdp group stays inside
    one host whenever fsdp <= devices per host, so parameter all-gathers use NVLink, not the network.
    """
    if isinstance(spec, Mesh):
        return spec
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"]), AXES)


def batch_size_multiple(mesh: Mesh) -> int:
    """Rows must be a multiple of this (devices the batch is split over)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(n_rows: int, mesh: Mesh, what: str = "batch") -> None:
    k = batch_size_multiple(mesh)
    if n_rows % k:
        raise UserError(f"{what} of {n_rows} rows is not divisible by the {k} devices of the mesh "
                        f"{dict(mesh.shape)}; use a multiple of {k}")


# ----------------------------------------------------------------------------- shardings
def batch_spec() -> P:
    return P(BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 split over data x fsdp, the rest replicated (a prefix for a whole batch dict)."""
    return NamedSharding(mesh, batch_spec())


def constrain_batch(tree, mesh: Optional[Mesh]):
    """Inside jit: rows of every array in `tree` split over the batch axes (no-op without a mesh).

    Needed after gathering a mini-batch with a global permutation (`x[perm]`): without it XLA
    may keep the gathered rows replicated and every device computes the whole mini-batch.
    """
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _is_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


def param_spec(shape: Sequence[int], fsdp: int, stacked: bool = False,
               min_size: int = MIN_SHARD_SIZE) -> P:
    """PartitionSpec of one parameter: fsdp on its largest divisible dim (see module docstring)."""
    shape = tuple(int(s) for s in shape)
    if fsdp <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    dims = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if stacked and len(dims) > 1 and 0 in dims:
        dims.remove(0)
    if not dims:
        return P()
    best = max(dims, key=lambda d: (shape[d], -d))
    return P(*([None] * best + ["fsdp"]))


def param_shardings(shape_tree: Any, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> Any:
    """NamedSharding per leaf of a tree of arrays or `jax.ShapeDtypeStruct`s (`jax.eval_shape`)."""
    fsdp = mesh.shape["fsdp"]

    def one(path, x):
        return NamedSharding(mesh, param_spec(np.shape(x), fsdp, _is_stacked(path), min_size))
    return jax.tree_util.tree_map_with_path(one, shape_tree)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A hashable tree of shardings (tree structure + leaves): usable as a compile-cache key and,
    through `.tree`, as jit in/out shardings."""
    treedef: Any
    leaves: tuple

    @classmethod
    def of(cls, tree_of_shardings) -> "Layout":
        leaves, treedef = jax.tree_util.tree_flatten(tree_of_shardings)
        return cls(treedef, tuple(leaves))

    @property
    def tree(self):
        return jax.tree_util.tree_unflatten(self.treedef, list(self.leaves))


def param_layout(shape_tree: Any, mesh: Mesh) -> Layout:
    return Layout.of(param_shardings(shape_tree, mesh))


# ----------------------------------------------------------------------------- placement
def _put_one(x, sharding: NamedSharding):
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable or sharding.is_fully_addressable:
            return jax.device_put(x, sharding)  # same set of processes: a reshard
    elif sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # multi-process: every process holds the same host value and uploads only its own shards
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put(tree: Any, shardings: Any) -> Any:
    """Places a tree (host or device arrays) with a matching tree of shardings (or one sharding)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: _put_one(x, shardings), tree)
    return jax.tree_util.tree_map(_put_one, tree, shardings)


def put_params(tree: Any, mesh: Mesh) -> Any:
    """Parameters / optimizer state placed with `param_shardings` (fsdp-sharded, else replicated)."""
    return put(tree, param_shardings(tree, mesh))


def put_batch(tree: Any, mesh: Mesh) -> Any:
    """Every leaf split on axis 0 over data x fsdp (scalars replicated)."""
    bs, rep = batch_sharding(mesh), replicated(mesh)
    return jax.tree_util.tree_map(lambda x: _put_one(x, bs if np.ndim(x) else rep), tree)


def init_sharded(fn, mesh: Mesh, *args):
    """`jax.jit(fn, out_shardings=param_shardings(jax.eval_shape(fn, *args)))(*args)`: the result is
    created directly sharded, never materialised whole on one device (e.g. 7B random weights)."""
    shapes = jax.eval_shape(fn, *args)
    return jax.jit(fn, out_shardings=param_shardings(shapes, mesh))(*args)


# ----------------------------------------------------------------------------- host side
def to_host(tree: Any) -> Any:
    """numpy copy of every leaf; arrays split across processes are all-gathered (a collective:
    every process must call it)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree_util.tree_map(one, tree)


def process_rows(n_rows: int) -> slice:
    """This process's contiguous share of `n_rows` host rows (host work split without overlap)."""
    k, i = jax.process_count(), jax.process_index()
    if n_rows % k:
        raise UserError(f"{n_rows} rows cannot be split evenly over {k} processes; use a multiple of {k}")
    per = n_rows // k
    return slice(i * per, (i + 1) * per)


def allgather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenates every process's `local` rows in process order (identity for one process)."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


# ----------------------------------------------------------------------------- processes
def is_main_process() -> bool:
    """Process 0 writes logs, plots and exports; Orbax checkpoints are written by every process."""
    return jax.process_index() == 0


def init_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                     mode: str = "") -> bool:
    """`jax.distributed.initialize` when asked; returns True when it ran.

    mode '' : initialise only when --coordinator_address or --num_processes > 1 is given.
    mode 'auto': let JAX detect the cluster (SLURM, Open MPI, Kubernetes, TPU pods) from the
    environment. 'off': never. Must run before anything touches a device. On CPU the collectives
    go through gloo.
    """
    if mode not in ("", "auto", "off"):
        raise UserError(f"--distributed={mode!r}; choose auto or off ('' = only with --coordinator_address)")
    if mode == "off" or (mode == "" and not coordinator_address and num_processes <= 1):
        return False
    if mode == "" and (not coordinator_address or num_processes <= 1 or process_id < 0):
        raise UserError("multi-process runs need --coordinator_address=HOST:PORT, --num_processes=N (> 1) "
                        "and --process_id=I on every process (or --distributed=auto under SLURM)")
    if mode == "" and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be in [0, {num_processes})")
    platforms = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
    if "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if mode == "":
        kw = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    elif coordinator_address:
        kw["coordinator_address"] = coordinator_address
    jax.distributed.initialize(**kw)
    return True
