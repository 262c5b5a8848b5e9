"""Every singular-value method of `ranks` against numpy: classical rank (numpy's fp32
`matrix_rank`), effective and stable rank (float64 SVD), on matrices of known rank, tall / wide /
square, zero, near-zero scale, and singular values at 10x / 0.1x the rank tolerance."""
import os
from functools import partial

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrl_sparse.analysis import ranks  # noqa: E402
from jaxrl_sparse.errors import UserError  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
METHODS = [m for m in ranks.RANK_METHODS if ranks.method_unavailable(m) is None]
EXACT = [m for m in METHODS if m != "gram32"]      # gram32's floor is above tol (documented)


def _orth(rng, n, k):
    return np.linalg.qr(rng.normal(size=(n, k)))[0]


def _with_spectrum(rng, m, n, s):
    """fp32 matrix [m, n] with singular values s (float64 before the cast)."""
    k = len(s)
    return (_orth(rng, m, k) @ np.diag(s) @ _orth(rng, n, k).T).astype(np.float32)


def _near_tol_spectrum(m, n):
    """5 large σ, two at 10·tol, two at 0.1·tol (tol = σ_1·max(m, n)·eps32): rank 7."""
    tol = max(m, n) * EPS32
    return np.array([1.0, 0.7, 0.4, 0.2, 0.1, 10 * tol, 10 * tol, 0.1 * tol, 0.1 * tol])


def _cases():
    """{shape: (stack [B, m, n] fp32, expected classical ranks [B])}; one compile per shape."""
    rng = np.random.default_rng(0)
    prod = lambda m, n, r: (rng.normal(size=(m, r)) @ rng.normal(size=(r, n))).astype(np.float32)  # noqa: E731
    tall = [prod(40, 24, 6), np.zeros((40, 24), np.float32),
            (1e-30 * prod(40, 24, 2).astype(np.float64)).astype(np.float32),
            _with_spectrum(rng, 40, 24, _near_tol_spectrum(40, 24))]
    wide = [prod(24, 40, 3), _with_spectrum(rng, 24, 40, _near_tol_spectrum(24, 40)), prod(24, 40, 24)]
    square = [prod(24, 24, 9), _with_spectrum(rng, 24, 24, np.linspace(1.0, 0.1, 24)), prod(24, 24, 1)]
    return {"tall": (np.stack(tall), [6, 0, 2, 7]), "wide": (np.stack(wide), [3, 7, 24]),
            "square": (np.stack(square), [9, 24, 1])}


CASES = _cases()


def _numpy_stats(a):
    """(matrix_rank, effective, stable) of one fp32 matrix; effective/stable from float64."""
    if not np.any(a):
        return 0, 0.0, 0.0
    a64 = a.astype(np.float64)
    s = np.linalg.svd(a64, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return (int(np.linalg.matrix_rank(a)), float(np.exp(-(p * np.log(p)).sum())),
            float((a64 ** 2).sum() / s[0] ** 2))


@pytest.fixture(scope="module")
def stats():
    """{method: {case: {stat: np.ndarray [B]}}}."""
    xs = {c: jnp.asarray(x) for c, (x, _) in CASES.items()}
    out = {}
    for m in METHODS:                           # one compile per method for all three shapes
        fn = jax.jit(lambda xs, m=m: {c: ranks.spectrum_stats(x, m) for c, x in xs.items()})
        out[m] = jax.device_get(fn(xs))
    return out


def test_cases_are_what_they_claim():
    for x, expected in CASES.values():
        assert [_numpy_stats(a)[0] for a in x] == expected      # numpy's fp32 matrix_rank agrees


@pytest.mark.parametrize("method", EXACT)
def test_exact_methods_match_numpy(stats, method):
    for case, (x, expected) in CASES.items():
        st = stats[method][case]
        for i, a in enumerate(x):
            rank, eff, stable = _numpy_stats(a)
            assert st["rank"][i] == rank == expected[i], (method, case, i)
            np.testing.assert_allclose(st["effective"][i], eff, rtol=5e-4, atol=0,
                                       err_msg=f"{method} {case} {i}")
            np.testing.assert_allclose(st["stable"][i], stable, rtol=1e-4, atol=0,
                                       err_msg=f"{method} {case} {i}")
            np.testing.assert_allclose(st["fro"][i], np.linalg.norm(a.astype(np.float64)), rtol=1e-5)
            np.testing.assert_allclose(st["rank_frac"][i], rank / min(a.shape))


def test_gram_methods_zero_exact_tails(stats):
    """The float64 floor makes the tail of an exactly low-rank update 0: effective rank of a
    rank-1 matrix is 1 to fp32 precision (fp32 SVD leaves ~1e-7·σ_1 noise σ's instead)."""
    for m in [m for m in ("gram64", "gram64t") if m in METHODS]:
        assert stats[m]["square"]["effective"][2] == pytest.approx(1.0, abs=1e-6)


def test_gram32_documented_floor(stats):
    """gram32 is exact where no σ lies between tol and its floor sqrt(k·eps32)·σ_1, and drops
    the σ's at 10·tol (below that floor) of the near-tolerance matrices: rank 5, not 7."""
    st = stats["gram32"]
    assert st["tall"]["rank"].tolist() == [6, 0, 2, 5]
    assert st["wide"]["rank"].tolist()[:2] == [3, 5]
    assert st["square"]["rank"].tolist() == [9, 24, 1]
    for case, (x, _) in CASES.items():
        for i, a in enumerate(x):
            _, eff, stable = _numpy_stats(a)
            np.testing.assert_allclose(st[case]["stable"][i], stable, rtol=1e-4, atol=0)
            np.testing.assert_allclose(st[case]["effective"][i], eff, rtol=5e-4, atol=0)


def test_singular_values_orientation_and_order():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 7)).astype(np.float32)
    want = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    for m in METHODS:
        s = np.asarray(jax.jit(partial(ranks.singular_values, method=m))(jnp.asarray(a)))
        assert s.shape == (7,) and np.all(np.diff(s) <= 0), m
        np.testing.assert_allclose(s, want, rtol=1e-4 if m == "gram32" else 1e-5, err_msg=m)


def test_tree_delta_stats_methods_agree_and_bad_names():
    rng = np.random.default_rng(1)
    w0 = {"layers/attn/q_proj/kernel": rng.normal(size=(2, 12, 12)).astype(np.float32),
          "layers/mlp/down_proj/kernel": rng.normal(size=(2, 30, 12)).astype(np.float32),
          "lm_head/kernel": rng.normal(size=(12, 40)).astype(np.float32)}
    wt = {k: v + (0.01 * rng.normal(size=v.shape[:-1] + (2,)) @ rng.normal(size=(2, v.shape[-1]))
                  ).astype(np.float32) for k, v in w0.items()}          # rank-2 updates
    args = (w0, wt, jnp.float32(1e-6), jnp.float32(3.0))
    ref, n_ref = jax.device_get(ranks.tree_delta_stats(*args, method="svd"))
    for m in ("gram64",):
        st, n_upd = jax.device_get(ranks.tree_delta_stats(*args, method=m))
        assert n_upd == n_ref
        for path in ref:
            assert st[path]["rank"].tolist() == ref[path]["rank"].tolist() == [2.0] * len(st[path]["rank"])
            np.testing.assert_allclose(st[path]["effective"], ref[path]["effective"], rtol=1e-4)
            np.testing.assert_allclose(st[path]["stable"], ref[path]["stable"], rtol=1e-4)
            np.testing.assert_array_equal(st[path]["density"], ref[path]["density"])
    with pytest.raises(UserError, match="unknown rank method 'nope'.*gram64"):
        ranks.tree_delta_stats(*args, method="nope")
    with pytest.raises(UserError, match="unknown rank method"):
        ranks.layer_rank_stats({"lm_head": {"kernel": wt["lm_head/kernel"]}},
                               {"lm_head": {"kernel": w0["lm_head/kernel"]}}, tau=1e-6, method="x")
    from jaxrl_sparse.analysis import report
    with pytest.raises(UserError, match="unknown rank method"):
        report.analyze(report.AnalyzeConfig(base="a", final="b", rank_method="svdd", progress=False))


def test_default_and_availability(monkeypatch):
    assert ranks.DEFAULT_RANK_METHOD in ranks.RANK_METHODS
    assert ranks.check_method(None) == ranks.DEFAULT_RANK_METHOD
    monkeypatch.setattr(ranks, "DEFAULT_RANK_METHOD", "gram64")     # read at call time
    assert ranks.check_method(None) == "gram64"
    assert ranks.method_unavailable("jacobi", platform="cpu")        # gesvdj: GPU only
    assert ranks.method_unavailable("svd", platform="cpu") is None


def test_bench_rank_methods_small():
    from jaxrl_sparse.analysis import bench_analyze
    res = bench_analyze.main(["--small", "--rank_methods=gram64,jacobi"])["rank_methods"]
    assert "skipped" in res["jacobi"]                                 # CPU: printed note, no crash
    for m in ("svd", "gram64"):                                       # svd: always, the reference
        assert res[m]["s"] > 0 and res[m]["first_call_s"] > 0
        assert res[m]["vs_svd"]["n_rank_mismatch"] == 0
        assert res[m]["vs_f64_layer0"]["max_abs_d_rank"] == 0
        assert res[m]["vs_f64_layer0"]["max_abs_d_stable"] < 1e-3
