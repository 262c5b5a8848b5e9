"""Benchmark plumbing that runs on a CPU: the dispatcher and the head-gemm benchmark's variants."""
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


def test_ppo_bench_small_with_update_breakdown():
    from jaxrl_sparse.bench import ppo as bench_ppo
    rows = bench_ppo.main(["--settings=small", "--repeats=1", "--breakdown"])
    row = rows[0]
    assert row["setting"] == "small" and row["batch"] == 4 and row["mini_batch"] == 2
    assert row["s_per_iter"] == pytest.approx(row["rollout_s"] + row["reward_s"] + row["update_s"])
    parts = row["update_parts"]
    assert set(parts) == {"score", "grad", "optimizer", "mb_step"}
    assert all(v > 0 for v in parts.values())
    with pytest.raises(UserError, match="unknown 'nope'"):
        bench_ppo.main(["--settings=nope"])
