"""The analyzer: streams a run's checkpoints through the jitted counts, writes plots + tables.

Series mode (`ckpt_dir`): W_0 = the earliest checkpoint of the directory (or `base`), W_T = the
latest requested step that reads. W_T is read first (coverage needs it), then every requested step
is streamed one at a time, so at most three copies of the tracked weights (W_0, W_T, W_t) are on the
device (four while comparing with a second run). A requested step that is absent or unreadable is
reported and becomes a gap (NaN / null), never a crash.

Pair mode (`base` + `final`): any two models — Orbax checkpoint dirs (latest step), step dirs
(`DIR/<step>`), or whatever `jaxrl_sparse.models.load_params` reads (HF folder / hub id / GGUF).

Devices (`mesh`, a `jaxrl_sparse.parallel` spec): each stacked leaf [L, m, n] is placed with its
layer axis split over the mesh's devices (data x fsdp, else 'data') when L divides them, so the
jitted rank/density programs run data-parallel over layers; other leaves are replicated. Every
matrix's statistics are computed by the same per-matrix code either way, so results equal one
device's. Multi-host: every process reads the checkpoints and runs the same program; results are
gathered with `parallel.to_host`, and only process 0 writes files.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np
from tqdm import tqdm

from jaxrl_sparse import checkpoint, parallel
from jaxrl_sparse import tree as tree_lib
from jaxrl_sparse.analysis import deltas, mask as mask_lib, plots, ranks
from jaxrl_sparse.errors import UserError

CSV_COLUMNS = ("layer", "module", "rows", "cols", "rank", "effective_rank", "stable_rank", "density")


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    ckpt_dir: Optional[str] = None          # one run's Orbax checkpoint dir (series mode)
    taus: Tuple[float, ...] = (1e-7, 1e-6, 1e-5)   # |ΔW| thresholds, one 'tau' view each
    steps: Optional[Tuple[int, ...]] = None  # steps to analyze; None = every step in ckpt_dir
    include: Optional[str] = None           # tracked-parameter regex; None = deltas.DEFAULT_INCLUDE
    out: Optional[str] = None               # output dir; None = <parent of ckpt_dir>/plots, or ./plots
    compare_dir: Optional[str] = None       # second run: overlap of the two final subnetworks
    mask_out: Optional[str] = None          # write the final update mask (.npz) here
    mask_tau: Optional[float] = None        # tau of that mask; None = the smallest tau
    mask_untracked: bool = False            # untracked leaves in the mask: False (frozen) / True
    base: Optional[str] = None              # W_0 from another source (series mode) / pair mode base
    final: Optional[str] = None             # pair mode: the fine-tuned model
    progress: bool = True                   # tqdm bar over steps
    rank_method: Optional[str] = None       # ranks.RANK_METHODS key; None = ranks.DEFAULT_RANK_METHOD
    mesh: Optional[str] = ""                # device mesh 'data:N,fsdp:M' ('' = all devices on data; None = default device)


def default_out(cfg: AnalyzeConfig) -> str:
    if cfg.out:
        return cfg.out
    if cfg.ckpt_dir:
        return os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt_dir.rstrip("/"))), "plots")
    return "plots"


# ---------------------------------------------------------------------------- model sources


class _Source:
    """A model to read tracked leaves from: a checkpoint step, or a loaded params tree."""

    def __init__(self, label: str, ckpt_dir: Optional[str] = None, step: Optional[int] = None,
                 params=None, mesh=None):
        self.label, self.ckpt_dir, self.step, self._params = label, ckpt_dir, step, params
        self.mesh = mesh

    def shapes(self) -> Dict[str, tuple]:
        if self._params is not None:
            return {p: tuple(x.shape) for p, x in tree_lib.flatten(self._params).items()}
        meta = checkpoint.tree_metadata(self.ckpt_dir, self.step)
        if not isinstance(meta, dict) or "params" not in meta:
            raise UserError(f"{self.label} holds no 'params' key; save checkpoints as "
                            "{'params': model_params, ...} (jaxrl_sparse.checkpoint convention)")
        return {p: tuple(m.shape) for p, m in tree_lib.flatten(meta["params"]).items()}

    def tracked_paths(self, include: Optional[str]) -> List[str]:
        shapes = self.shapes()
        return list(deltas.select_tracked(
            tree_lib.unflatten({p: np.empty((0,)) for p in shapes}), include))

    def load(self, paths: List[str]) -> Dict[str, jax.Array]:
        """{path: device array} for `paths`; reads only those leaves from a checkpoint."""
        if self._params is not None:
            flat = tree_lib.flatten(self._params)
            missing = [p for p in paths if p not in flat]
            if missing:
                raise UserError(f"{self.label} lacks tracked parameters {missing[:4]}; "
                                "is it the same model?")
            return place({p: flat[p] for p in paths}, self.mesh)
        tree = checkpoint.restore_params(self.ckpt_dir, self.step, paths=paths)
        flat = tree_lib.flatten(tree)
        return place({p: flat[p] for p in paths}, self.mesh)


def stack_sharding(shape, mesh):
    """Sharding of a tracked leaf on `mesh`: a stack [L, m, n] (ndim >= 3) split on L over
    data x fsdp when L divides their product, else over 'data' when L divides it; else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    if len(shape) >= 3:
        for axes in (parallel.BATCH_AXES, ("data",)):
            k = int(np.prod([mesh.shape[a] for a in axes]))
            if k > 1 and shape[0] % k == 0:
                return NamedSharding(mesh, P(axes))
    return parallel.replicated(mesh)


def place(flat: Dict[str, object], mesh) -> Dict[str, jax.Array]:
    """{path: array} on the device(s): `stack_sharding` on a mesh, the default device without one."""
    if mesh is None:
        return jax.device_put(flat)
    return {p: parallel.put(x, stack_sharding(tuple(np.shape(x)), mesh)) for p, x in flat.items()}


def resolve_source(spec: str, mesh=None) -> _Source:
    """An Orbax checkpoint dir (latest step), a step dir `DIR/<step>`, or a model for
    `jaxrl_sparse.models.load_params` (HF folder, hub id, GGUF file)."""
    path = spec.rstrip("/")
    if os.path.isdir(path) and checkpoint.all_steps(path):
        step = checkpoint.latest_step(path)
        return _Source(f"{path} (step {step})", path, step, mesh=mesh)
    parent, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(path) and name.isdigit() and int(name) in checkpoint.all_steps(parent):
        return _Source(f"{parent} (step {name})", parent, int(name), mesh=mesh)
    try:
        from jaxrl_sparse.models import load_params  # lazily: a heavy, optional dependency here
    except ImportError as e:
        raise UserError(f"{spec!r} is not an Orbax checkpoint dir or step dir, and the model loader "
                        f"jaxrl_sparse.models.load_params is unavailable ({e}); pass a checkpoint "
                        "dir") from e
    loaded = load_params(spec)
    params = loaded[0] if isinstance(loaded, tuple) else loaded  # (params, config) or params
    return _Source(spec, params=params, mesh=mesh)


# ---------------------------------------------------------------------------- the analysis


def _final_stats(w0, wf, shapes, views, rank_method: Optional[str] = None):
    """(final counts per view [V] int64, csv rows of ranks + densities at the smallest tau)."""
    fc = parallel.to_host(deltas.step_counts(w0, wf, wf, views))
    tau0 = views[0].tau if views[0].kind == "tau" else 0.0
    spec, _ = parallel.to_host(ranks.tree_delta_stats(w0, wf, np.float32(tau0), np.float32(3.0),
                                                    rank_method))
    rows = []
    for path in w0:
        if path not in spec:                                   # 1-D leaves: densities only
            continue
        _, m, n = deltas.matrix_layout(shapes[path])
        layer_counts = deltas.per_layer_counts(path, shapes[path], np.asarray(fc[path][0][0]))
        st = {k: np.asarray(v).reshape(-1) for k, v in spec[path].items()}
        for i, (layer, count) in enumerate(layer_counts):
            rows.append({"layer": layer, "module": deltas.module_name(path), "rows": m, "cols": n,
                         "rank": int(st["rank"][i]), "effective_rank": float(st["effective"][i]),
                         "stable_rank": float(st["stable"][i]), "fro": float(st["fro"][i]),
                         "density": 100.0 * count / (m * n)})
    return deltas.totals({k: v[0] for k, v in fc.items()}), rows, fc


def _overlap(w0, wf, other: _Source, paths, views, n_total):
    steps = checkpoint.all_steps(other.ckpt_dir)
    ob, of = _Source(f"{other.ckpt_dir} (step {steps[0]})", other.ckpt_dir, steps[0], mesh=other.mesh), other
    w0b = ob.load(paths)
    deltas.check_same_layout(w0, w0b, "this run", other.label)
    wfb = of.load(paths)
    oc, same = deltas.overlap_counts(w0, wf, w0b, wfb, views)
    same_base = bool(all(parallel.to_host(same).values()))
    s1 = deltas.totals({k: v[0] for k, v in oc.items()})
    s2 = deltas.totals({k: v[1] for k, v in oc.items()})
    s12 = deltas.totals({k: v[2] for k, v in oc.items()})
    out = {"other": of.label, "other_base": ob.label, "same_base": same_base, "views": {}}
    for i, v in enumerate(views):
        a, b, ab = int(s1[i]), int(s2[i]), int(s12[i])
        out["views"][v.name] = {
            "size_1": a, "size_2": b, "intersection": ab,
            "o1": ab / a if a else None, "o2": ab / b if b else None,
            "expected_random_intersection": a * b / n_total,
            "random_o1": b / n_total, "random_o2": a / n_total}
    return out


def analyze(cfg: AnalyzeConfig) -> dict:
    """Runs the analysis, writes the files into `default_out(cfg)` (process 0), returns the summary dict."""
    views = deltas.make_views(cfg.taus)
    rank_method = ranks.check_method(cfg.rank_method)   # before any checkpoint is read
    mesh = None if cfg.mesh is None else parallel.make_mesh(cfg.mesh)
    main = parallel.is_main_process()
    out_dir = default_out(cfg)
    missing: Dict[int, str] = {}
    if cfg.ckpt_dir:
        available = checkpoint.all_steps(cfg.ckpt_dir)
        if not available:
            raise UserError(f"no checkpoints in --ckpt_dir={cfg.ckpt_dir!r} (expected step-numbered "
                            "Orbax subfolders written by jaxrl_sparse.checkpoint.save)")
        requested = sorted(set(cfg.steps)) if cfg.steps else available
        for s in requested:
            if s not in available:
                missing[s] = "no such checkpoint"
        base = resolve_source(cfg.base, mesh) if cfg.base else _Source(
            f"{cfg.ckpt_dir} (step {available[0]})", cfg.ckpt_dir, available[0], mesh=mesh)
        final, wf = None, None
        for s in reversed([s for s in requested if s not in missing]):   # final first
            src = _Source(f"{cfg.ckpt_dir} (step {s})", cfg.ckpt_dir, s, mesh=mesh)
            try:
                shapes = src.shapes()
            except UserError as e:
                missing[s] = str(e)
                continue
            paths = src.tracked_paths(cfg.include)      # a bad --include is fatal, not a gap
            try:
                wf, final = src.load(paths), src
                break
            except UserError as e:
                missing[s] = str(e)
        if final is None:
            raise UserError(f"none of the requested steps of {cfg.ckpt_dir!r} could be read: "
                            + "; ".join(f"{s}: {r}" for s, r in sorted(missing.items())))
    else:
        if not (cfg.base and cfg.final):
            raise UserError("pass --ckpt_dir=DIR (a run's checkpoints), or --base=A and --final=B")
        base, final = resolve_source(cfg.base, mesh), resolve_source(cfg.final, mesh)
        shapes = final.shapes()
        paths = final.tracked_paths(cfg.include)
        wf, requested = final.load(paths), []
    w0 = base.load(paths)
    deltas.check_same_layout(w0, wf, base.label, final.label)
    n_total = deltas.n_weights(wf)

    final_sizes, rows, final_counts = _final_stats(w0, wf, shapes, views, rank_method)

    active = {v.name: [None] * len(requested) for v in views}
    inter = {v.name: [None] * len(requested) for v in views}
    bar = tqdm(requested, desc="checkpoints", unit="step", disable=not (cfg.progress and main))
    for j, s in enumerate(bar):
        if s in missing:
            continue
        if final.ckpt_dir is not None and s == final.step:
            c = final_counts
        else:
            try:
                wt = w0 if (not cfg.base and s == base.step) else _Source(
                    f"{cfg.ckpt_dir} (step {s})", cfg.ckpt_dir, s, mesh=mesh).load(paths)
            except UserError as e:
                missing[s] = str(e)
                continue
            c = deltas.step_counts(w0, wt, wf, views)
            del wt
        a = deltas.totals({k: v[0] for k, v in c.items()})
        b = deltas.totals({k: v[1] for k, v in c.items()})
        for i, v in enumerate(views):
            active[v.name][j], inter[v.name][j] = int(a[i]), int(b[i])

    summary = {
        "mode": "series" if cfg.ckpt_dir else "pair", "ckpt_dir": cfg.ckpt_dir,
        "base": base.label, "final": final.label, "base_step": base.step, "final_step": final.step,
        "include": cfg.include or deltas.DEFAULT_INCLUDE, "tracked": paths,
        "n_tracked_weights": n_total, "steps": requested, "rank_method": rank_method,
        "missing_steps": {str(s): r for s, r in sorted(missing.items())},
        "density_unit": "% of tracked weights", "coverage_unit": "% of the final subnetwork",
        "views": {}}
    for i, v in enumerate(views):
        size = int(final_sizes[i])
        summary["views"][v.name] = {
            "kind": v.kind, "tau": v.tau, "final_size": size,
            "final_density_pct": 100.0 * size / n_total,
            "active": active[v.name], "intersect_final": inter[v.name],
            "density_pct": [None if x is None else 100.0 * x / n_total for x in active[v.name]],
            "coverage_pct": [None if x is None or size == 0 else 100.0 * x / size
                             for x in inter[v.name]]}
    if cfg.compare_dir:
        other = resolve_source(cfg.compare_dir, mesh)
        if other.ckpt_dir is None:
            raise UserError("--compare_dir must be an Orbax checkpoint dir of another run")
        summary["overlap"] = _overlap(w0, wf, other, paths, views, n_total)
    if cfg.mask_out:   # computed by every process (gathering sharded arrays is a collective)
        tau = cfg.mask_tau if cfg.mask_tau is not None else min(cfg.taus)
        m = mask_lib.update_mask(tree_lib.unflatten(dict(w0)), tree_lib.unflatten(dict(wf)), tau=tau,
                                 include=cfg.include, untracked=cfg.mask_untracked, shapes=shapes)
    if not main:
        return summary
    os.makedirs(out_dir, exist_ok=True)
    files = []
    if cfg.mask_out:
        meta = {"tau": tau, "include": summary["include"], "base": base.label,
                "final": final.label, "untracked": cfg.mask_untracked}
        files.append(mask_lib.save_update_mask(cfg.mask_out, m, meta=meta))
        summary["mask"] = dict(mask_lib.read_mask_meta(files[-1]), path=files[-1])
    files += _write_outputs(out_dir, summary, rows, views)
    summary["files"] = files
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=1)
    return summary


def _write_outputs(out_dir, summary, rows, views) -> List[str]:
    files = [os.path.join(out_dir, "summary.json")]
    csv_path = os.path.join(out_dir, "layer_ranks.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(["-" if r["layer"] is None else r["layer"], r["module"], r["rows"], r["cols"],
                        r["rank"], f"{r['effective_rank']:.6g}", f"{r['stable_rank']:.6g}",
                        f"{r['density']:.6g}"])
    files.append(csv_path)
    if summary["steps"]:
        files += plots.coverage_and_density(
            out_dir, summary["steps"],
            {k: v["coverage_pct"] for k, v in summary["views"].items()},
            {k: v["density_pct"] for k, v in summary["views"].items()})
    if rows:
        files.append(plots.layer_ranks(os.path.join(out_dir, "layer_ranks.png"), rows))
        files.append(plots.density_heatmap(os.path.join(out_dir, "density_heatmap.png"), rows,
                                           views[0].tau))
    return files


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"base: {summary['base']}   final: {summary['final']}",
             f"tracked: {summary['n_tracked_weights']:,} weights in {len(summary['tracked'])} tensors "
             f"({summary['include']})"]
    if summary["steps"]:
        n_ok = len(summary["steps"]) - len(summary["missing_steps"])
        lines.append(f"steps: {n_ok}/{len(summary['steps'])} analyzed")
    for s, why in summary["missing_steps"].items():
        lines.append(f"  missing step {s}: {why}")
    lines.append(f"{'view':<12} {'final density %':>16} {'final size':>14}  coverage % (first..last step)")
    for name, v in summary["views"].items():
        cov = [c for c in v["coverage_pct"] if c is not None]
        cov_s = f"{cov[0]:.2f} .. {cov[-1]:.2f}" if cov else "-"
        lines.append(f"{name:<12} {v['final_density_pct']:>16.4f} {v['final_size']:>14,}  {cov_s}")
    if "overlap" in summary:
        o = summary["overlap"]
        lines.append(f"overlap with {o['other']} (same base: {o['same_base']}):")
        for name, v in o["views"].items():
            f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
            lines.append(f"  {name:<12} o1={f(v['o1'])} o2={f(v['o2'])}  random: "
                         f"o1={v['random_o1']:.4f} o2={v['random_o2']:.4f}")
    if "mask" in summary:
        m = summary["mask"]
        lines.append(f"update mask (tau={m['tau']:g}): {m['n_true']:,}/{m['n_total']:,} True -> {m['path']}")
    lines.append("wrote: " + ", ".join(summary.get("files", [])))
    return "\n".join(lines)
