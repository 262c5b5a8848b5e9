"""Benchmark plumbing that runs on a CPU: the dispatcher and the head-gemm benchmark's variants."""
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse.bench import dispatch, head
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig


@pytest.mark.parametrize("tied", [True, False])
def test_head_variants_equal_explicit_product(tied):
    cfg = ModelConfig("llama", 96, 16, 32, 1, 2, 1, 8, tie_embeddings=tied, dtype="float32").validate()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 16) if tied else (16, 96)).astype(np.float32)
    params = {"embed": {"embedding": jnp.asarray(w)}} if tied else {"lm_head": {"kernel": jnp.asarray(w)}}
    h = rng.standard_normal((3, 16)).astype(np.float32)
    want = h @ (w.T if tied else w)
    for name, f in head.variants(cfg).items():
        got = np.asarray(jax.jit(f)(params, jnp.asarray(h)))
        assert got.dtype == np.float32 and got.shape == (3, 96), name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)


def test_head_bench_runs_and_dispatch_errors():
    rows = dispatch(["head", "--models=smollm2-135m", "--batch=2", "--repeats=1"])
    assert len(rows) == 1 and rows[0]["bound_ms"] > 0
    assert all(rows[0][f"{v}_ms"] > 0 for v in ("decoder", "f32_accumulate_out", "vocab_major_out", "vocab_split_4"))
    with pytest.raises(UserError, match="unknown benchmark"):
        dispatch(["nope"])
    with pytest.raises(UserError, match="unknown model shape"):
        dispatch(["head", "--models=nope"])


@pytest.mark.parametrize("noise_prompt", [True, False])
def test_es_bench_small_np_runs(noise_prompt):
    from jaxrl_sparse.bench import es as bench_es
    res = bench_es.run(small=True, methods=("np",), np_noise_prompt=noise_prompt)
    ph = res["methods"]["np"]
    assert res["np_noise_prompt"] == noise_prompt
    assert ph["total_s"] > 0 and ph["generate_s"] > 0 and ph["update_s"] > 0


def test_ppo_bench_small_with_update_breakdown(tmp_path):
    import pstats
    from jaxrl_sparse.bench import ppo as bench_ppo
    prof = tmp_path / "host.prof"
    rows = bench_ppo.main(["--settings=small", "--repeats=1", "--breakdown", "--layer_loop=on",
                           f"--host_profile={prof}"])
    row = rows[0]
    # one more iteration under cProfile: the sampler's host-side call is in it
    assert any(fn[2] == "generate" for fn in pstats.Stats(str(prof)).stats)
    assert row["setting"] == "small" and row["batch"] == 4 and row["mini_batch"] == 2
    assert row["s_per_iter"] == pytest.approx(row["rollout_s"] + row["reward_s"] + row["update_s"])
    parts = row["update_parts"]  # with the layer loop: also the state into its per-layer carry and back
    assert set(parts) == {"score", "grad", "optimizer", "mb_step", "carry_in", "carry_out"}
    assert all(v > 0 for v in parts.values())
    assert len(row["state_digest"]) == 16  # the state after the run, bit for bit (`common.tree_digest`)
    with pytest.raises(UserError, match="unknown 'nope'"):
        bench_ppo.main(["--settings=nope"])
    # the next rollout queued behind the update or dispatched after it (the trainer's order): same work
    on, off = bench_ppo.main(["--settings=small", "--repeats=1", "--layer_loop=on", "--pipeline"])[0], row
    assert on["pipeline"] and not off["pipeline"]
    assert on["state_digest"] == off["state_digest"]


def test_gemm_bench_rewrites_equal_the_products_and_run():
    """The two rewrites `launch.bench gemm` times compute the same products; the command runs."""
    from jaxrl_sparse.bench.gemm import batched_weight_grads, split_k_product
    k = jax.random.split(jax.random.key(0), 4)
    x, w = jax.random.normal(k[0], (6, 32)), jax.random.normal(k[1], (32, 8))
    for s in (2, 4):
        np.testing.assert_allclose(np.asarray(split_k_product(x, w, s)), np.asarray(x @ w), rtol=1e-5, atol=1e-5)
    xs, dys = jax.random.normal(k[2], (3, 6, 8)), jax.random.normal(k[3], (3, 6, 5))
    want = np.stack([np.asarray(xs[l]).T @ np.asarray(dys[l]) for l in range(3)])
    np.testing.assert_allclose(np.asarray(batched_weight_grads(xs, dys)), want, rtol=1e-5, atol=1e-5)
    small = ["gemm", "--rows=8", "--hidden=16", "--inner=32", "--qkv=48", "--layers=3", "--reps=2"]
    rows = dispatch(small + ["--split_k=2", "--parts=products"])
    assert len(rows) == 4 + 2 + 8  # 4 forwards, split-K where N = hidden (attn out, mlp down), 4 x 2 weight grads
    assert all(r["us_per_call"] > 0 for r in rows)
    # weight gradient + Adam, XLA's and fused (off the GPU the fused call lowers to the same jnp: no error)
    rows = dispatch(small + ["--parts=dw_adam", "--dw_adam_blocks=32x32x16w4s2t"])
    assert [r["variant"] for r in rows[:2]] == ["XLA: gemm, then Adam", "fused 16x16x16w4s2t"]  # fitted to qkv: K 16, N 48
    assert len(rows) == 4 * 2 and all(r["max_err"] == 0.0 and r["us_per_call"] > 0 for r in rows)
    with pytest.raises(UserError, match="split_k"):
        dispatch(["gemm", "--split_k=two"])
    with pytest.raises(UserError, match="BKxBN"):
        dispatch(["gemm", "--dw_adam_blocks=64x64"])


def test_skinny_matmul_kernel_equals_the_product():
    """`launch.bench gemm --parts=skinny`'s split-contraction kernel (interpreted) computes a @ b and
    a @ bᵀ; the sweep keeps tiles that divide the product with grids of half to 4x the SMs."""
    from jaxrl_sparse.bench import skinny_matmul as sm
    from jaxrl_sparse.bench.gemm import skinny_sweep
    k = jax.random.split(jax.random.key(0), 2)
    a, b = jax.random.normal(k[0], (32, 96)), jax.random.normal(k[1], (96, 48))
    want = np.asarray(a) @ np.asarray(b)
    for t in (sm.Tiles(16, 16, 16, splits=3), sm.Tiles(32, 48 // 3, 32, splits=1)):
        got = sm.matmul(a, b, tiles=t, interpret=True)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
        got = sm.matmul(a, b.T, trans_b=True, tiles=t, interpret=True)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert sm.partials(a, b, tiles=sm.Tiles(16, 16, 16, splits=3), interpret=True).shape == (3, 32, 48)
    with pytest.raises(ValueError, match="do not divide"):
        sm.partials(a, b, tiles=sm.Tiles(16, 16, 64, splits=2), interpret=True)  # 96 is not 2 x 64
    assert sm.parse("64x128x32k4w4s3") == sm.Tiles(64, 128, 32, 4, 4, 3)
    assert sm.parse("64x128x32w4s3") == sm.Tiles(64, 128, 32, 1, 4, 3)
    with pytest.raises(UserError, match="BMxBN"):
        sm.parse("64x128")
    # gpt2-medium's mlp down forward at M = 320 with 64 x 128 tiles: 40 tiles, so 2..8 splits (80..320
    # programs) where the split divides the contraction of 4096 into steps of 32 (not 3 or 6)
    assert [t.splits for t in skinny_sweep(320, 4096, 1024, ["64x128x32w4s3"])] == [2, 4, 8]
    small = ["gemm", "--rows=8", "--hidden=16", "--inner=32", "--qkv=48", "--reps=2", "--parts=skinny"]
    rows = dispatch(small)  # no tile fits so few SMs' worth of programs: XLA's rows only, three per projection
    assert len(rows) == 12 and {r["variant"] for r in rows} == {"XLA"}
    assert [r["product"] for r in rows[:3]] == ["qkv forward", "qkv forward, W stored [N, K]", "qkv input grad"]
    with pytest.raises(UserError, match="--skinny_cases: unknown 'backward'"):
        dispatch(small + ["--skinny_cases=backward"])
    with pytest.raises(UserError, match="BMxBNxBK"):
        dispatch(small + ["--skinny_tiles=64x64"])


def test_attention_bench_needs_a_gpu():
    """`launch.bench attention` times Triton kernels: off a GPU (and for a bad part) a one-line error."""
    if jax.default_backend() != "gpu":
        with pytest.raises(UserError, match="run it on a CUDA GPU"):
            dispatch(["attention"])
    with pytest.raises(UserError, match="--parts: unknown 'prefill'"):
        dispatch(["attention", "--parts=prefill"])


def test_profile_tables_and_hlo_op_names(tmp_path):
    """`launch.bench profile BENCH`: traced tables written as JSON; `--profile_hlo` names kernels from
    XLA's optimized-HLO dumps (fusions by name or by the name they were deduplicated with)."""
    from jaxrl_sparse.bench import profile
    out = tmp_path / "p.json"
    tables = dispatch(["profile", "head", "--models=smollm2-135m", "--batch=2", "--repeats=1",
                       f"--profile_out={out}", "--profile_top=5", f"--profile_dir={tmp_path / 'trace'}"])
    assert tables and json.loads(out.read_text()).keys() == tables.keys()
    assert max(t["busy_ms"] for t in tables.values()) > 0
    with pytest.raises(UserError, match="no host event named 'nope'"):
        profile.span_report(profile.latest_trace(str(tmp_path / "trace")), "nope")
    dump = tmp_path / "hlo"
    dump.mkdir()
    (dump / "module_0007.jit_update.sm_9.0a_gpu_after_optimizations.txt").write_text(
        '  %loop_add_fusion.98 = (f32[8]{0}) fusion(%a, %b), kind=kLoop, calls=%fused_add.98, '
        'metadata={op_name="jit(update)/while/body/add" deduplicated_name="loop_add_fusion.54"}\n'
        '  ROOT %gemm_fusion_dot.3 = f32[4,4]{1,0} fusion(%x, %y), kind=kCustom, '
        'metadata={op_name="jit(update)/mlp/down_proj/dot_general"}\n'
        '  %add.1 = f32[8]{0} add(%a, %b)\n')
    (dump / "module_0002.jit_run.sm_9.0a_gpu_after_optimizations.txt").write_text(
        '  %gemm_fusion_dot.3 = f32[4,4]{1,0} fusion(%x, %y), kind=kCustom, metadata={op_name="jit(run)/qkv/dot_general"}\n')
    (dump / "module_0007.jit_update.sm_9.0a_gpu_after_optimizations-buffer-assignment.txt").write_text(
        '  %other_fusion.1 = f32[8]{0} fusion(%a), metadata={op_name="nope"}\n')
    ops = profile.hlo_ops(str(dump))
    assert ops == {"loop_add_fusion_54": "jit_update: jit(update)/while/body/add",
                   "loop_add_fusion_98": "jit_update: jit(update)/while/body/add",
                   "gemm_fusion_dot_3": "jit_run: jit(run)/qkv/dot_general; "
                                        "jit_update: jit(update)/mlp/down_proj/dot_general"}
    t = profile.annotate({"gpu": {"busy_ms": 3.0, "events": 3, "span_ms": 3.0,
                                  "top": [("loop_add_fusion_54", 2, 2.0), ("sm90_xmma_gemm", 1, 1.0)]}}, ops)
    assert t["gpu"]["top"] == [("loop_add_fusion_54", 2, 2.0, "jit_update: jit(update)/while/body/add"),
                               ("sm90_xmma_gemm", 1, 1.0, "")]
    with pytest.raises(UserError, match="xla_dump_to"):
        profile.hlo_ops(str(tmp_path / "empty"))


def test_span_gaps_are_the_uncovered_stretches_and_the_host_events_then(capsys):
    from jaxrl_sparse.bench import profile
    # kernels (ns) overlapping, unsorted, one reaching past the window [0, 1000)
    busy, gaps = profile.busy_and_gaps([(500, 600), (100, 300), (250, 400), (950, 2000)], 0, 1000,
                                       min_gap_ns=100)
    assert busy == 300 + 100 + 50 and gaps == [(0, 100), (400, 500), (600, 950)]
    assert profile.busy_and_gaps([(0, 1000)], 0, 1000) == (1000, [])
    assert profile.busy_and_gaps([(10, 20)], 0, 1000, min_gap_ns=15) == (10, [(20, 1000)])  # 10 ns: not a gap
    host = [("update", 0, 90_000_000), ("graph update", 1_000_000, 10_000_000),
            ("launch", 10_000_000, 15_000_000), ("tiny", 2_000_000, 2_010_000)]
    assert profile.innermost(host, 2_000_000, 12_000_000) == ["launch", "graph update", "update"]
    assert profile.innermost(host, 2_000_000, 12_000_000, n=1) == ["launch"]
    profile.print_span({"span": "ppo iteration 2", "span_ms": 90.0, "kernels": 3, "busy_ms": 80.0, "idle_ms": 10.0,
                        "gaps": [{"at_ms": 1.0, "ms": 10.0, "host": ["launch", "graph update"]}]})
    assert "| 1.00 | 10.00 | launch < graph update |" in capsys.readouterr().out


def test_rows_record_xla_flags(monkeypatch):
    """A benchmark row names the XLA_FLAGS it ran under (the variant of a flag sweep), none when unset."""
    from jaxrl_sparse.bench.common import device_info
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert "xla_flags" not in device_info()
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_cudnn_layer_norm=true")
    assert device_info()["xla_flags"] == "--xla_gpu_enable_cudnn_layer_norm=true"


def test_tree_digest_is_bit_exact():
    """Equal trees (however reduced) give equal digests; one flipped bit in one element, a swapped
    pair of leaves or a bf16 leaf's last bit give another."""
    from jaxrl_sparse.bench.common import tree_digest
    a = {"w": jnp.arange(1000, dtype=jnp.float32) / 7, "b": jnp.ones((3,), jnp.bfloat16), "n": jnp.int32(5)}
    assert tree_digest(a) == tree_digest(jax.tree_util.tree_map(jnp.copy, a))
    w = np.asarray(a["w"]).copy()
    w.view(np.uint32)[123] ^= 1  # the last mantissa bit of one element
    assert tree_digest({**a, "w": jnp.asarray(w)}) != tree_digest(a)
    b = np.asarray(a["b"]).copy()
    b.view(np.uint16)[0] ^= 1
    assert tree_digest({**a, "b": jnp.asarray(b)}) != tree_digest(a)
    assert tree_digest({"w": a["b"], "b": a["w"], "n": a["n"]}) != tree_digest(a)


def test_sampler_bench_times_every_width_with_equal_tokens():
    rows = dispatch(["sampler", "--shapes=3x5003", "--chunks=0,16,auto", "--steps=3"])
    assert rows[0]["auto_chunk"] == 8 and set(rows[0]["us_per_step"]) == {"0", "16", "auto"}
    assert all(t > 0 for t in rows[0]["us_per_step"].values())
    with pytest.raises(UserError, match="is not BxV"):
        dispatch(["sampler", "--shapes=3by5003"])
