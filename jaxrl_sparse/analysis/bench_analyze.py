"""Benchmark: the analyzer's density/coverage pass and rank pass vs the seed's method.

    python -m launch.bench analyze [--preset=gpt2-medium] [--n_ckpts=31] [--seed_subset=2]
    python -m launch.bench analyze --small          # seconds on a CPU (used by a test)
    python -m launch.bench analyze --rank_methods=svd,gram64,gram32,qr,jacobi [--small]

`--rank_methods` runs only the rank comparison: W_0 and the final checkpoint are generated, then
each `ranks.RANK_METHODS` entry is timed on all matrices (first call incl. compile, second call)
and its classical / effective / stable ranks are compared with "svd" on every matrix, and with a
float64 numpy SVD of layer 0's matrices + the unstacked ones (`--no_rank_ref64` skips that).
Methods the installed JAX (or this platform) lacks are skipped with a printed note.

A series of `n_ckpts` checkpoints at real shapes (attention q/k/v/o + MLP up/down + lm_head in the
BUILD_NOTES layout) is generated on the device with random sparse deltas that grow over the run:
W_t = W_0 + [u < final_density · t/(n-1)] · ε,  u ~ U(0,1), ε ~ 1e-3·N(0,1), W_0 ~ 0.02·N(0,1).

* ours: `deltas.step_counts` over the in-memory series (taus + exact + bf16 views; compute only,
  compile excluded and reported apart); the same loop `report.analyze` runs per checkpoint.
* seed: a re-creation of analyze_sparse_subnetwork.py's method on CPU torch — per 2-D matrix,
  `(W_t - W_0).abs() > tau` -> `nonzero` -> global indices into a Python `set`, coverage by set
  intersection — timed on `seed_subset` checkpoints (the final one first) and extrapolated linearly
  to `n_ckpts` (final step once + the inside steps' mean for the rest). Its counts are checked against ours (`coverage_match`).
* ranks: all per-layer SVD statistics of ΔW for one checkpoint (`ranks.tree_delta_stats`), and
  torch CPU `svdvals` on layer 0's matrices + lm_head, extrapolated to all layers.
* io (optional, `--io_ckpts`): `checkpoint.save` / `restore_params` of the tracked weights.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.analysis import deltas, ranks
from jaxrl_sparse.errors import UserError

PRESETS = {  # layers, d_model, d_ff, vocab
    "gpt2-medium": (24, 1024, 4096, 50257),
    "gpt2-small": (12, 768, 3072, 50257),
    "tiny": (2, 64, 256, 512),
}


def shapes_for(preset: str) -> Dict[str, tuple]:
    """Tracked kernel shapes (BUILD_NOTES layout; the analyzer's default regex selects exactly these)."""
    n_layers, d, f, v = PRESETS[preset]
    out = {f"layers/attn/{p}/kernel": (n_layers, d, d) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    out["layers/mlp/up_proj/kernel"] = (n_layers, d, f)
    out["layers/mlp/down_proj/kernel"] = (n_layers, f, d)
    out["lm_head/kernel"] = (d, v)
    return out


@partial(jax.jit, static_argnames=("shapes",))
def _checkpoint(key, shapes: Tuple[Tuple[str, tuple], ...], frac):
    """W_t of every leaf, regenerated from `key` so that all steps share W_0, u and ε.

    One normal draw z [3, N] for all leaves (one RNG op compiles fast on CPU):
    W_0 = 0.02·z_0, ε = 1e-3·z_1, u = Φ(z_2) ~ U(0, 1).
    """
    sizes = [math.prod(s) for _, s in shapes]
    z = jax.random.normal(key, (3, sum(sizes)), jnp.float32)
    out, start = {}, 0
    for (p, shape), n in zip(shapes, sizes):
        w0, eps, zu = (z[i, start:start + n].reshape(shape) for i in range(3))
        u = jax.scipy.special.ndtr(zu)
        out[p] = 0.02 * w0 + jnp.where(u < frac, 1e-3 * eps, 0.0)
        start += n
    return out


def make_series(key, shapes: Dict[str, tuple], n_ckpts: int, final_density: float):
    fracs = [final_density * t / max(n_ckpts - 1, 1) for t in range(n_ckpts)]
    return [_checkpoint(key, tuple(shapes.items()), jnp.float32(fr)) for fr in fracs]


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def bench_ours(series, views):
    """Seconds for the whole coverage/density pass (compile excluded) and the counts per step."""
    w0, wf = series[0], series[-1]
    t0 = time.perf_counter()
    _block(deltas.step_counts(w0, series[1], wf, views))
    compile_s = time.perf_counter() - t0
    counts = []
    t0 = time.perf_counter()
    for wt in series:
        c = deltas.step_counts(w0, wt, wf, views)
        counts.append((deltas.totals({k: v[0] for k, v in c.items()}),
                       deltas.totals({k: v[1] for k, v in c.items()})))
    return time.perf_counter() - t0, compile_s, counts


def seed_sets(torch_w0, torch_wt, taus: Sequence[float]) -> List[set]:
    """The seed's method: per 2-D matrix, indices with |W_t - W_0| > tau into Python sets."""
    sets = [set() for _ in taus]
    offset = 0
    for name in torch_w0:
        w0, wt = torch_w0[name], torch_wt[name]
        mats = [(w0, wt)] if w0.ndim == 2 else [(w0[l], wt[l]) for l in range(w0.shape[0])]
        for a, b in mats:
            d = (b - a).abs()
            for i, tau in enumerate(taus):
                idx = (d > tau).flatten().nonzero().squeeze(1) + offset
                sets[i].update(idx.tolist())
            offset += a.numel()
    return sets


def bench_seed(series, taus, subset: int):
    import torch  # benchmark-only dependency

    def host(tree):
        return {k: torch.from_numpy(np.array(v)) for k, v in tree.items()}  # writable copy

    n = len(series)
    # the final step, then steps evenly inside the run (density grows linearly, so their mean
    # time is the mean over all steps)
    picks = [n - 1] + sorted({int(round(x)) for x in np.linspace(0, n - 1, subset + 1)[1:-1]} - {n - 1})
    w0 = host(series[0])
    times, results = [], {}
    final_sets = None
    for t in picks:
        wt = host(series[t])
        t0 = time.perf_counter()
        sets = seed_sets(w0, wt, taus)
        if final_sets is None:
            final_sets = sets
        inter = [len(s & f) for s, f in zip(sets, final_sets)]
        times.append(time.perf_counter() - t0)
        results[t] = ([len(s) for s in sets], inter)
        del wt, sets
    return times, results, picks


def bench_ranks(w0, wf, method: Optional[str] = None, return_stats: bool = False):
    """(first call incl. compile, second call) seconds for every matrix's rank statistics
    [, the host stats {path: {stat: [L]}} of the second call]."""
    args = (w0, wf, jnp.float32(1e-6), jnp.float32(3.0), method)
    t0 = time.perf_counter()
    jax.device_get(ranks.tree_delta_stats(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats, _ = jax.device_get(ranks.tree_delta_stats(*args))
    second = time.perf_counter() - t0
    return (first, second, stats) if return_stats else (first, second)


RANK_KEYS = ("rank", "effective", "stable")


def _np_rank_stats(a: np.ndarray) -> Dict[str, float]:
    """Reference ranks of one fp32 matrix a [m, n] from a float64 SVD (the definitions of
    `ranks.spectrum_stats`, on a / max|a| in fp32 as there)."""
    a = a.astype(np.float32)
    scale = np.max(np.abs(a))
    if scale == 0:
        return {k: 0.0 for k in RANK_KEYS}
    an = (a / scale).astype(np.float64)
    s = np.linalg.svd(an, compute_uv=False)
    tol = s[0] * max(a.shape) * np.finfo(np.float32).eps
    p = s / s.sum()
    p = p[p > 0]
    return {"rank": float(np.sum(s > tol)), "effective": float(np.exp(-(p * np.log(p)).sum())),
            "stable": float((an ** 2).sum() / s[0] ** 2)}


def _max_diffs(stats, ref, index=None) -> Dict[str, float]:
    """max |Δ| of each RANK_KEYS stat over all matrices (or matrix `index` of each path) and
    the number of matrices whose classical rank differs."""
    out = {f"max_abs_d_{k}": 0.0 for k in RANK_KEYS}
    out["n_rank_mismatch"] = 0
    for path, st in stats.items():
        for k in RANK_KEYS:
            a = np.asarray(st[k], np.float64).reshape(-1)
            b = np.asarray(ref[path][k], np.float64).reshape(-1)
            if index is not None:
                a = a[index:index + 1]
            d = np.abs(a - b)
            out[f"max_abs_d_{k}"] = max(out[f"max_abs_d_{k}"], float(d.max()))
            if k == "rank":
                out["n_rank_mismatch"] += int(np.sum(d > 0))
    return out


def _rank_groups(w0, wf) -> Dict[tuple, jax.Array]:
    """ΔW of every matrix stacked per (wide-oriented) shape, as `ranks.tree_delta_stats` groups them."""
    groups: Dict[tuple, list] = {}
    for p in w0:
        d = wf[p].astype(jnp.float32) - w0[p].astype(jnp.float32)
        d = d.reshape((-1,) + d.shape[-2:])
        if d.shape[1] > d.shape[2]:
            d = jnp.swapaxes(d, 1, 2)
        groups.setdefault(tuple(d.shape[1:]), []).append(d)
    return {s: _block(jnp.concatenate(ds)) for s, ds in groups.items()}


def bench_rank_methods(w0, wf, methods: Sequence[str], ref64: bool = True,
                       by_shape: bool = False) -> Dict[str, dict]:
    """Per method: first/second call seconds of `ranks.tree_delta_stats` on all matrices, max |Δ|
    of the ranks vs "svd" (all matrices) and vs a float64 numpy SVD (layer 0 + unstacked
    matrices), optionally seconds per matrix shape. Unavailable methods: {"skipped": why}."""
    ref64_stats = None
    if ref64:
        ref64_stats = {}
        for p in w0:
            layer0 = (lambda w: w[(0,) * (w.ndim - 2)])         # layer 0 of a stacked leaf
            d = np.asarray(layer0(wf[p]), np.float32) - np.asarray(layer0(w0[p]), np.float32)
            ref64_stats[p] = {k: [v] for k, v in _np_rank_stats(d).items()}
    groups = _rank_groups(w0, wf) if by_shape else None
    out: Dict[str, dict] = {}
    svd_stats = None
    for m in ["svd"] + [m for m in methods if m != "svd"]:   # "svd" first: the reference
        why = ranks.method_unavailable(m)
        if why is None:
            try:
                first, second, stats = bench_ranks(w0, wf, m, return_stats=True)
            except Exception as e:      # noqa: BLE001  lowering / solver / API missing: note it
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if why is not None:
            print(f"note: rank method {m!r} skipped: {why}")
            out[m] = {"skipped": why}
            continue
        r = {"first_call_s": first, "s": second}
        print(f"  {m}: {second:.2f} s (first call {first:.2f} s)", flush=True)
        if m == "svd":
            svd_stats = stats
        r["vs_svd"] = _max_diffs(stats, svd_stats) if svd_stats is not None else None
        if ref64_stats is not None:
            r["vs_f64_layer0"] = _max_diffs(stats, ref64_stats, index=0)
        if groups is not None:
            r["s_by_shape"] = {}
            fn = jax.jit(partial(ranks.spectrum_stats, method=m))
            for shape, x in groups.items():
                _block(fn(x))
                t0 = time.perf_counter()
                _block(fn(x))
                r["s_by_shape"][f"{x.shape[0]}x{shape[0]}x{shape[1]}"] = time.perf_counter() - t0
        out[m] = r
    return out


def print_rank_methods(res: Dict[str, dict], ref64: bool):
    head = (f"  {'method':<8} {'1st call s':>10} {'2nd s':>7}  vs svd: {'|Δrank| (#)':>12} "
            f"{'|Δeff|':>8} {'|Δstable|':>9}")
    if ref64:
        head += f"  vs f64 (layer 0): {'|Δrank|':>7} {'|Δeff|':>8} {'|Δstable|':>9}"
    print(head)
    for m, r in res.items():
        if "skipped" in r:
            print(f"  {m:<8} skipped: {r['skipped']}")
            continue
        v = r["vs_svd"]
        line = f"  {m:<8} {r['first_call_s']:>10.2f} {r['s']:>7.2f}          "
        line += (f"{v['max_abs_d_rank']:>7.0f} ({v['n_rank_mismatch']}) {v['max_abs_d_effective']:>8.2g} "
                 f"{v['max_abs_d_stable']:>9.2g}") if v else f"{'(no svd reference)':>31}"
        if ref64:
            f = r["vs_f64_layer0"]
            line += (f"                    {f['max_abs_d_rank']:>7.0f} {f['max_abs_d_effective']:>8.2g} "
                     f"{f['max_abs_d_stable']:>9.2g}")
        print(line)
        if "s_by_shape" in r:
            print("           by shape: " + ", ".join(f"{k} {t:.2f} s" for k, t in r["s_by_shape"].items()))


def bench_torch_ranks(w0, wf):
    """torch CPU svdvals of layer 0's matrices + unstacked ones, extrapolated to all layers."""
    import torch
    t_layer0 = t_single = 0.0
    n_layers = 1
    for p in w0:
        d = torch.from_numpy(np.asarray(wf[p]) - np.asarray(w0[p]))
        m = d[0] if d.ndim == 3 else d
        t0 = time.perf_counter()
        torch.linalg.svdvals(m)
        dt = time.perf_counter() - t0
        if d.ndim == 3:
            t_layer0 += dt
            n_layers = d.shape[0]
        else:
            t_single += dt
    return t_layer0 * n_layers + t_single


def bench_io(series, n_io: int):
    from jaxrl_sparse import checkpoint, tree as tree_lib
    d = tempfile.mkdtemp(prefix="bench_analyze_")
    try:
        t0 = time.perf_counter()
        for t in range(n_io):
            checkpoint.save(d, t, {"params": tree_lib.unflatten(dict(series[-1 - t]))})
        save_s = (time.perf_counter() - t0) / n_io
        t0 = time.perf_counter()
        for t in range(n_io):
            _block(jax.device_put(checkpoint.restore_params(d, t)))
        load_s = (time.perf_counter() - t0) / n_io
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return save_s, load_s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m launch.bench analyze", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2-medium", choices=sorted(PRESETS))
    ap.add_argument("--n_ckpts", type=int, default=31)
    ap.add_argument("--seed_subset", type=int, default=2, help="checkpoints timed with the seed method")
    ap.add_argument("--final_density", type=float, default=0.2)
    ap.add_argument("--taus", default="1e-7,1e-6,1e-5")
    ap.add_argument("--io_ckpts", type=int, default=0, help="also time save/restore of N checkpoints")
    ap.add_argument("--no_torch_ranks", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny shapes, 5 checkpoints: CPU seconds")
    ap.add_argument("--rank_methods", default=None,
                    help="comma-separated ranks.RANK_METHODS keys: time and compare only these "
                         f"(choices: {','.join(ranks.RANK_METHODS)})")
    ap.add_argument("--no_rank_ref64", action="store_true",
                    help="with --rank_methods: skip the float64 numpy reference on layer 0")
    ap.add_argument("--rank_by_shape", action="store_true",
                    help="with --rank_methods: also time each matrix shape on its own")
    ap.add_argument("--json_out", default=None)
    a = ap.parse_args(argv)
    if a.small:
        a.preset, a.n_ckpts, a.seed_subset, a.no_torch_ranks = "tiny", 5, 2, True
    taus = [float(x) for x in a.taus.split(",")]
    views = deltas.make_views(taus)
    shapes = shapes_for(a.preset)
    n_w = sum(math.prod(s) for s in shapes.values())
    dev = jax.devices()[0]
    if a.rank_methods is not None:
        return main_rank_methods(a, shapes, n_w, dev)
    print(f"device: {dev.device_kind} ({dev.platform}); preset {a.preset}: {n_w:,} tracked weights "
          f"({n_w * 4 / 1e9:.2f} GB fp32) x {a.n_ckpts} checkpoints; views: "
          + ", ".join(v.name for v in views))

    t0 = time.perf_counter()
    series = _block(make_series(jax.random.key(0), shapes, a.n_ckpts, a.final_density))
    gen_s = time.perf_counter() - t0

    ours_s, compile_s, counts = bench_ours(series, views)
    seed_times, seed_res, picks = bench_seed(series, taus, max(1, min(a.seed_subset, a.n_ckpts)))
    match = all(
        [int(x) for x in counts[t][0][: len(taus)]] == seed_res[t][0]
        and [int(x) for x in counts[t][1][: len(taus)]] == seed_res[t][1] for t in picks)
    rank_first, rank_s = bench_ranks(series[0], series[-1])
    torch_rank_s = None if a.no_torch_ranks else bench_torch_ranks(series[0], series[-1])
    io = bench_io(series, a.io_ckpts) if a.io_ckpts > 0 else None

    # the final step once + the mean of the inside steps for the others (see bench_seed)
    seed_total = seed_times[0] + (float(np.mean(seed_times[1:])) if len(seed_times) > 1
                                  else seed_times[0]) * (a.n_ckpts - 1)
    seed_per = seed_total / a.n_ckpts
    res = {
        "device": dev.device_kind, "preset": a.preset, "n_weights": n_w, "n_ckpts": a.n_ckpts,
        "views_ours": [v.name for v in views], "taus_seed": taus,
        "generate_s": gen_s, "ours_compile_s": compile_s, "ours_total_s": ours_s,
        "ours_s_per_ckpt": ours_s / a.n_ckpts,
        "ours_gbps": 3 * n_w * 4 * a.n_ckpts / ours_s / 1e9,
        "seed_ckpts_timed": picks, "seed_s_per_ckpt": seed_per,
        "seed_s_timed": seed_times, "seed_total_s_extrapolated": seed_total,
        "speedup": seed_total / ours_s,
        "coverage_match": bool(match),
        "final_density_pct": 100.0 * float(counts[-1][0][0]) / n_w,
        "ranks_first_call_s": rank_first, "ranks_s": rank_s, "torch_cpu_ranks_s_extrapolated": torch_rank_s,
        "io_save_s_per_ckpt": io[0] if io else None, "io_restore_s_per_ckpt": io[1] if io else None,
    }
    rows = [
        ("generate series on device", f"{gen_s:.2f} s", ""),
        ("ours: density+coverage, all ckpts", f"{ours_s:.3f} s",
         f"{res['ours_s_per_ckpt'] * 1e3:.1f} ms/ckpt, {len(views)} views, "
         f"{res['ours_gbps']:.0f} GB/s of W_0+W_t+W_T; compile {compile_s:.2f} s"),
        ("seed: torch CPU + Python sets", f"{res['seed_total_s_extrapolated']:.1f} s",
         f"{seed_per:.2f} s/ckpt avg; timed steps {picks} "
         f"({', '.join(f'{x:.2f}' for x in seed_times)} s), extrapolated to {a.n_ckpts}; "
         f"{len(taus)} taus"),
        ("speed-up (whole pass)", f"{res['speedup']:.0f}x", f"counts identical: {match}"),
        ("ranks of one ckpt (all matrices)", f"{rank_s:.2f} s", f"first call incl. compile {rank_first:.2f} s"),
    ]
    if torch_rank_s is not None:
        rows.append(("torch CPU svdvals, same matrices", f"{torch_rank_s:.2f} s",
                     "layer 0 + lm_head timed, extrapolated to all layers"))
    if io:
        rows.append(("io: checkpoint.save / restore", f"{io[0]:.2f} / {io[1]:.2f} s",
                     f"per ckpt ({n_w * 4 / 1e9:.2f} GB), {n_w * 4 / 1e9 / io[1]:.2f} GB/s restore"))
    w = max(len(r[0]) for r in rows)
    print(f"final density (tau={taus[0]:g}): {res['final_density_pct']:.2f}%")
    for name, val, note in rows:
        print(f"  {name:<{w}}  {val:>14}  {note}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main_rank_methods(a, shapes, n_w, dev) -> dict:
    """`--rank_methods` mode: W_0 and the final checkpoint only, then `bench_rank_methods`."""
    methods = [m.strip() for m in a.rank_methods.split(",") if m.strip()]
    if not methods:
        raise UserError("--rank_methods is empty; pass e.g. --rank_methods=svd,gram64")
    for m in methods:
        ranks.check_method(m)
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; preset {a.preset}: "
          f"{n_w:,} tracked weights; rank methods {methods} (default: {ranks.DEFAULT_RANK_METHOD})")
    key, items = jax.random.key(0), tuple(shapes.items())
    w0 = _block(_checkpoint(key, items, jnp.float32(0.0)))
    wf = _block(_checkpoint(key, items, jnp.float32(a.final_density)))
    t0 = time.perf_counter()
    res_m = bench_rank_methods(w0, wf, methods, ref64=not a.no_rank_ref64, by_shape=a.rank_by_shape)
    total = time.perf_counter() - t0
    print_rank_methods(res_m, ref64=not a.no_rank_ref64)
    print(f"  (all methods: {total:.1f} s)")
    res = {"device": dev.device_kind, "jax": jax.__version__, "preset": a.preset, "n_weights": n_w,
           "default_rank_method": ranks.DEFAULT_RANK_METHOD, "rank_methods": res_m,
           "rank_methods_total_s": total}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
