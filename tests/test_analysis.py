"""Analyzer: ranks vs numpy, exact density/coverage/overlap on planted masks, bf16 visibility,
the update mask, the launcher end to end, and the benchmark's --small run."""
import csv
import glob
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrl_sparse import checkpoint  # noqa: E402
from jaxrl_sparse.analysis import deltas, mask as mask_lib, ranks, report  # noqa: E402
from jaxrl_sparse.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_stats = jax.jit(ranks.spectrum_stats)   # one compile per shape instead of op-by-op dispatch

# ---------------------------------------------------------------------------- ranks


def test_ranks_match_numpy_on_known_rank_products():
    rng = np.random.default_rng(0)
    true_ranks = [1, 3, 7]
    x = np.stack([rng.normal(size=(20, r)) @ rng.normal(size=(r, 30)) for r in true_ranks])
    x = x.astype(np.float32)                                       # [3, 20, 30]
    st = {k: np.asarray(v) for k, v in _stats(jnp.asarray(x)).items()}
    for i, r in enumerate(true_ranks):
        assert st["rank"][i] == r == np.linalg.matrix_rank(x[i])
        s = np.linalg.svd(x[i].astype(np.float64), compute_uv=False)
        p = s / s.sum()
        p = p[p > 0]
        np.testing.assert_allclose(st["effective"][i], np.exp(-(p * np.log(p)).sum()), rtol=2e-3)
        np.testing.assert_allclose(st["stable"][i], (x[i].astype(np.float64) ** 2).sum() / s[0] ** 2,
                                   rtol=1e-4)
        np.testing.assert_allclose(st["fro"][i], np.linalg.norm(x[i]), rtol=1e-5)
        np.testing.assert_allclose(st["rank_frac"][i], r / 20)
    assert 1.0 <= st["effective"][0] < 1.01 and st["stable"][0] == pytest.approx(1.0, rel=1e-4)


def test_identity_and_degenerate_matrices():
    eye = 3.5 * np.eye(6, dtype=np.float32)
    tiny = (1e-30 * np.outer(np.arange(1, 9), np.ones(5)) + 1e-30 * np.outer(np.ones(8), np.arange(5))
            ).astype(np.float32)                                   # rank 2 at 1e-30 scale
    zero = np.zeros((8, 5), np.float32)
    st = {k: np.asarray(v) for k, v in _stats(jnp.asarray(eye[None])).items()}
    assert st["rank"][0] == 6
    assert st["effective"][0] == pytest.approx(6.0, rel=1e-5)
    assert st["stable"][0] == pytest.approx(6.0, rel=1e-5)
    st = {k: np.asarray(v) for k, v in _stats(jnp.asarray(np.stack([tiny, zero]))).items()}
    assert np.linalg.matrix_rank(tiny) == 2
    assert st["rank"].tolist() == [2, 0]                           # relative tolerance; zero -> 0
    assert st["stable"][0] > 1.0 and st["stable"][1] == 0.0
    assert st["effective"][1] == 0.0 and st["fro"][1] == 0.0
    assert st["fro"][0] == pytest.approx(float(np.linalg.norm(tiny.astype(np.float64))), rel=1e-5)


def test_layer_rank_stats_keys_and_values():
    rng = np.random.default_rng(1)
    # W_0 on a 2^-8 grid and a rank-1 delta on a 2^-8 grid: W_0 + Δ is exact in fp32, so the stored
    # delta is exactly rank 1 (a rounded sum would add ~1e-7 noise above the rank tolerance, which
    # an accurate method such as gram64 rightly counts)
    w0 = {"layers": {"attn": {"q_proj": {"kernel": (np.round(rng.normal(size=(2, 8, 6)) * 256) / 256
                                                    ).astype(np.float32)}},
                     "input_norm": {"scale": np.ones((2, 8), np.float32)}},
          "lm_head": {"kernel": rng.normal(size=(8, 12)).astype(np.float32)}}
    d = np.zeros((2, 8, 6), np.float32)
    d[0] = np.outer(rng.integers(1, 4, size=8), rng.integers(-3, 4, size=6) | 1) / 256  # layer 0: rank 1, dense
    d[1, 0, 0] = 1.0                                                 # layer 1: one entry
    wt = {"layers": {"attn": {"q_proj": {"kernel": w0["layers"]["attn"]["q_proj"]["kernel"] + d}},
                     "input_norm": {"scale": np.full((2, 8), 2.0, np.float32)}},  # untracked
          "lm_head": {"kernel": w0["lm_head"]["kernel"].copy()}}
    out = ranks.layer_rank_stats(wt, w0, tau=1e-6, large_update_factor=3.0)
    assert out["rank/layers.0.attn.q_proj/rank"] == 1
    assert out["rank/layers.1.attn.q_proj/rank"] == 1
    assert out["rank/layers.1.attn.q_proj/density"] == pytest.approx(100 / 48)
    assert out["rank/layers.1.attn.q_proj/large_frac"] == pytest.approx(1 / 48)  # 1 > 3 * (1/48)
    assert out["rank/layers.0.attn.q_proj/density"] == pytest.approx(100.0)
    assert out["rank/lm_head/rank"] == 0 and out["rank/lm_head/effective"] == 0
    n_upd = 48 + 1
    assert out["rank/global/density"] == pytest.approx(100 * n_upd / (96 + 96))
    assert not any("input_norm" in k for k in out)


# ---------------------------------------------------------------------------- views


def test_bf16_visibility_view():
    w0 = jnp.asarray([1.0, 1.0, 1.0, 1.0, 2.0], jnp.float32)
    wt = jnp.asarray([1.0 + 2**-9, 1.0 + 2**-7, 1.0, 1.0 + 2**-20, 2.0 + 2**-6], jnp.float32)
    bf = deltas.updated(w0, wt, deltas.View("bf16"))
    ex = deltas.updated(w0, wt, deltas.View("exact"))
    tau = deltas.updated(w0, wt, deltas.View("tau", 1e-3))
    assert bf.tolist() == [False, True, False, False, True]     # bf16 spacing is 2^-7 at 1, 2^-6 at 2
    assert ex.tolist() == [True, True, False, True, True]
    assert tau.tolist() == [True, True, False, False, True]


# ---------------------------------------------------------------------------- planted series

L, D, F, V = 2, 8, 12, 20
STEPS = [0, 10, 20, 30]
SMALL = 1e-6   # |Δ| between the taus 1e-7 and 1e-5


def _base(rng):
    u = lambda *s: rng.uniform(0.5, 1.0, size=s).astype(np.float32)  # noqa: E731  fp32 spacing < 1.2e-7
    return {"embed": {"embedding": u(V, D)},
            "layers": {"attn": {"q_proj": {"kernel": u(L, D, D)}, "v_proj": {"kernel": u(L, D, D)}},
                       "mlp": {"up_proj": {"kernel": u(L, D, F)}, "down_proj": {"kernel": u(L, F, D)}},
                       "input_norm": {"scale": u(L, D)}},
            "lm_head": {"kernel": u(D, V)}}


def _plant(p0, seed):
    """Per tracked leaf: final set F, big/small magnitudes, per-step sets A_t (transients too)."""
    rng = np.random.default_rng(seed)
    flat = {k: v for k, v in deltas.select_tracked(p0).items()}
    plan = {}
    for k, w in flat.items():
        final = rng.uniform(size=w.shape) < 0.3
        small = final & (rng.uniform(size=w.shape) < 0.25)
        order = rng.uniform(size=w.shape)
        sets = {}
        for t in STEPS:
            frac = t / STEPS[-1]
            a = final & (order < frac)
            if 0 < t < STEPS[-1]:
                a = a | ((~final) & (rng.uniform(size=w.shape) < 0.05))  # transient updates
            sets[t] = a
        plan[k] = (final, small, sets)
    return plan


def _write_series(d, p0, plan):
    from jaxrl_sparse import tree as tree_lib
    for t in STEPS:
        flat = dict(tree_lib.flatten(p0))
        for k, (_, small, sets) in plan.items():
            mag = np.where(small, SMALL, 1e-3).astype(np.float32)
            flat[k] = (flat[k] + np.where(sets[t], mag, 0)).astype(np.float32)
        flat["layers/input_norm/scale"] = flat["layers/input_norm/scale"] + t  # untracked, changes
        checkpoint.save(d, t, {"params": tree_lib.unflatten(flat), "opt_state": {"n": np.int32(t)}},
                        metadata={"trainer": "synthetic"})


def _expected(plan, tau_big: bool):
    """Per step: (|A_t|, |A_t ∩ A_T|) summed over leaves; tau_big drops the small-magnitude ones."""
    out = {}
    for t in STEPS:
        a_sum = i_sum = 0
        for final, small, sets in plan.values():
            a = sets[t] & ~small if tau_big else sets[t]
            f = final & ~small if tau_big else final
            a_sum += int(a.sum())
            i_sum += int((a & f).sum())
        out[t] = (a_sum, i_sum)
    return out


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    p0 = _base(np.random.default_rng(0))
    plan = _plant(p0, 1)
    _write_series(str(root / "run1" / "ckpt"), p0, plan)
    plan2 = _plant(p0, 2)
    _write_series(str(root / "run2" / "ckpt"), p0, plan2)
    return root, p0, plan, plan2


def test_density_coverage_overlap_exact(series):
    root, p0, plan, plan2 = series
    out = str(root / "out_exact")
    cfg = report.AnalyzeConfig(ckpt_dir=str(root / "run1" / "ckpt"), taus=(1e-7, 1e-5),
                               steps=(0, 10, 15, 20, 30), out=out, compare_dir=str(root / "run2" / "ckpt"),
                               mask_out=str(root / "mask.npz"), progress=False)
    s = report.analyze(cfg)
    n = sum(int(np.prod(w.shape)) for w in deltas.select_tracked(p0).values())
    assert s["n_tracked_weights"] == n
    assert s["final_step"] == 30 and s["base_step"] == 0
    assert s["missing_steps"] == {"15": "no such checkpoint"}
    for view, tau_big in (("tau=1e-07", False), ("tau=1e-05", True), ("exact", False)):
        exp = _expected(plan, tau_big)
        v = s["views"][view]
        assert v["final_size"] == exp[30][0]
        assert v["active"] == [exp[0][0], exp[10][0], None, exp[20][0], exp[30][0]]
        assert v["intersect_final"] == [exp[0][1], exp[10][1], None, exp[20][1], exp[30][1]]
        assert v["coverage_pct"][2] is None and v["coverage_pct"][-1] == pytest.approx(100.0)
        assert v["density_pct"][1] == pytest.approx(100.0 * exp[10][0] / n)
    # transients: density at step 20 counts them, coverage does not
    v = s["views"]["tau=1e-07"]
    assert v["active"][3] > v["intersect_final"][3]

    o = s["overlap"]["views"]["tau=1e-07"]
    f1 = sum(int(p[0].sum()) for p in plan.values())
    f2 = sum(int(p[0].sum()) for p in plan2.values())
    f12 = sum(int((plan[k][0] & plan2[k][0]).sum()) for k in plan)
    assert (o["size_1"], o["size_2"], o["intersection"]) == (f1, f2, f12)
    assert o["o1"] == pytest.approx(f12 / f1) and o["o2"] == pytest.approx(f12 / f2)
    assert o["random_o1"] == pytest.approx(f2 / n) and o["expected_random_intersection"] == pytest.approx(f1 * f2 / n)
    assert s["overlap"]["same_base"] is True

    # the update mask: planted final sets on tracked leaves, untracked all False
    params_like = checkpoint.restore_params(str(root / "run1" / "ckpt"), 30)
    m = mask_lib.load_update_mask(str(root / "mask.npz"), params_like)
    for k, (final, _, _) in plan.items():
        node = m
        for part in k.split("/"):
            node = node[part]
        np.testing.assert_array_equal(node, final)
    assert not m["layers"]["input_norm"]["scale"].any() and not m["embed"]["embedding"].any()
    grads = {"a": jnp.ones((2, 3)), "b": jnp.full((4,), 2.0)}
    gm = mask_lib.apply_update_mask(grads, {"a": np.eye(2, 3, dtype=bool), "b": np.zeros(4, bool)})
    assert gm["a"].tolist() == [[1, 0, 0], [0, 1, 0]] and gm["b"].tolist() == [0, 0, 0, 0]
    with pytest.raises(UserError, match="another model"):
        mask_lib.load_update_mask(str(root / "mask.npz"), {"lm_head": {"kernel": np.zeros((3, 3))}})

    # per-layer density in the csv (smallest tau, final step)
    rows = list(csv.DictReader(open(os.path.join(out, "layer_ranks.csv"))))
    final_q, _, _ = plan["layers/attn/q_proj/kernel"]
    r = [x for x in rows if x["module"] == "attn.q_proj" and x["layer"] == "1"][0]
    assert float(r["density"]) == pytest.approx(100 * final_q[1].mean(), rel=1e-5)
    assert [x for x in rows if x["module"] == "lm_head"][0]["layer"] == "-"


def test_corrupt_step_is_a_gap_and_launcher_end_to_end(series, tmp_path):
    root, p0, plan, _ = series
    d = str(tmp_path / "ckpt")
    shutil.copytree(str(root / "run1" / "ckpt"), d)
    for p in glob.glob(os.path.join(d, "20", "state", "**", "d"), recursive=True):
        shutil.rmtree(p)                                        # step 20 is now corrupt
    out = str(tmp_path / "plots")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.analyze", f"--ckpt_dir={d}", "--taus=1e-7",
         "--include=attn/q_proj/kernel|lm_head", "--steps=0,10,20,25,30", f"--out={out}",
         "--noprogress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "missing step 20" in proc.stdout and "missing step 25" in proc.stdout
    for f in ("coverage_combined.png", "density_combined.png", "layer_ranks.png",
              "density_heatmap.png", "summary.json", "layer_ranks.csv"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    s = json.load(open(os.path.join(out, "summary.json")))
    assert "cannot be read" in s["missing_steps"]["20"]
    sub = {k: v for k, v in plan.items() if k in ("layers/attn/q_proj/kernel", "lm_head/kernel")}
    exp = _expected(sub, False)
    assert s["tracked"] == ["layers/attn/q_proj/kernel", "lm_head/kernel"]
    assert s["views"]["tau=1e-07"]["active"] == [exp[0][0], exp[10][0], None, None, exp[30][0]]
    with open(os.path.join(out, "layer_ranks.csv")) as f:
        header = next(csv.reader(f))
    assert header == ["layer", "module", "rows", "cols", "rank", "effective_rank", "stable_rank", "density"]

    bad = subprocess.run([sys.executable, "-m", "launch.analyze", f"--ckpt_dir={d}", "--taus=abc"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: --taus=abc" in bad.stderr and "Traceback" not in bad.stderr


def test_pair_mode_and_bad_include(series, tmp_path):
    root, p0, plan, _ = series
    ck = str(root / "run1" / "ckpt")
    s = report.analyze(report.AnalyzeConfig(base=os.path.join(ck, "0"), final=ck, taus=(1e-7, 1e-5),
                                            out=str(tmp_path / "pair"), progress=False))
    assert s["mode"] == "pair" and s["steps"] == []
    assert s["views"]["tau=1e-07"]["final_size"] == _expected(plan, False)[30][0]
    with pytest.raises(UserError, match="no tracked parameters match"):
        report.analyze(report.AnalyzeConfig(ckpt_dir=ck, include="nope", out=str(tmp_path / "x"),
                                            progress=False))


def test_bench_small_runs():
    from jaxrl_sparse.analysis import bench_analyze
    res = bench_analyze.main(["--small", "--taus=1e-6"])
    assert res["coverage_match"] is True                     # our counts == the seed-style set method
    assert res["ours_s_per_ckpt"] > 0 and res["seed_s_per_ckpt"] > 0
