"""`launch.score` and `launch.analyze` on a mesh of 4 fake CPU devices equal one device.

One subprocess (XLA_FLAGS must be set before JAX starts) scores a JSONL file with `score_file` on
data:2,fsdp:2 and data:4 (batch_size 3: every batch is padded to 4 rows, the last one holds 2 real
rows) and analyzes a tiny checkpoint series on data:2,fsdp:2; the same process computes the one-device
references (`mesh=None`). Log-probs agree to rtol 1e-5 (fsdp-split matmuls sum in another order);
ranks and densities are identical, effective/stable ranks agree to rtol 1e-6.
A bad --mesh gives the launchers' one-line error.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    assert jax.device_count() == 4
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from tiny_tokenizer import tiny_tokenizer
    from jaxrl_sparse import checkpoint, parallel
    from jaxrl_sparse.analysis import report
    from jaxrl_sparse.models import export_hf, load_model
    from jaxrl_sparse.models.config import ModelConfig
    from jaxrl_sparse.models.decoder import init_params
    from jaxrl_sparse.score import ScoreConfig, read_jsonl_texts, score_file, score_rows

    tmp, res = sys.argv[1], {}
    # ---- score: a tiny llama whose MLP kernels (64 x 256 = 2**14 entries) are fsdp-sharded
    cfg = ModelConfig("llama", 128, 64, 256, 2, 4, 2, 16, max_position_embeddings=128,
                      tie_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2).validate()
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    folder = export_hf(os.path.join(tmp, "model"), cfg, params, tiny_tokenizer())
    texts = os.path.join(tmp, "in.jsonl")
    rows = [{"text": "The cat sat on the mat.", "id": 0}, {"text": " the dog", "prompt": "Q: what? A:"},
            {"text": "x"}, {"text": "hello there, general"}, {"text": "the end", "prompt": "I say "}]
    with open(texts, "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in rows)
    lm = load_model(folder)
    res["score"] = {"one": score_rows(lm, read_jsonl_texts(texts), batch_size=3, bucket=32, progress=False)}
    mesh = parallel.make_mesh("data:2,fsdp:2")
    placed = parallel.put_params(lm.params, mesh)
    res["n_fsdp_leaves"] = sum("fsdp" in str(x.sharding.spec) for x in jax.tree_util.tree_leaves(placed))
    for spec in ("data:2,fsdp:2", "data:4"):
        out = os.path.join(tmp, spec.replace(":", "").replace(",", "_") + ".jsonl")
        n = score_file(ScoreConfig(model=folder, texts_file=texts, out=out, batch_size=3, bucket=32,
                                   progress=False, mesh=spec))
        assert n == len(rows)
        res["score"][spec] = [json.loads(l) for l in open(out)]

    # ---- analyze on data:2,fsdp:2: stacks of 4 layers (split over all 4 devices), of 2 layers
    # (split over 'data' only), an unstacked head (replicated)
    # W_0 on a 2^-8 grid, ΔW = (integer matrices of rank r, many zeros) / 256: W_0 + ΔW is exact
    # in fp32, so matrix i of a stack has rank 1 + i % 3 exactly
    rng = np.random.default_rng(0)
    u = lambda *s: (np.round(rng.uniform(0.5, 1.0, size=s) * 256) / 256).astype(np.float32)
    p0 = {"layers": {"attn": {"q_proj": {"kernel": u(4, 8, 6)}}, "mlp": {"up_proj": {"kernel": u(4, 6, 10)}}},
          "extra": {"layers": {"attn": {"o_proj": {"kernel": u(2, 8, 8)}}}}, "lm_head": {"kernel": u(8, 12)}}
    def delta(w):
        mats = w.reshape((-1,) + w.shape[-2:])
        return np.stack([rng.integers(-2, 3, (m.shape[0], 1 + i % 3)) @ rng.integers(-2, 3, (1 + i % 3, m.shape[1]))
                         for i, m in enumerate(mats)]).reshape(w.shape).astype(np.float32) / 256
    d = jax.tree_util.tree_map(delta, p0)
    ckpt = os.path.join(tmp, "ckpt")
    for t in (0, 1, 2):
        checkpoint.save(ckpt, t, {"params": jax.tree_util.tree_map(lambda w, x: w + t * x, p0, d)})
    res["planted_ranks"] = sorted(int(np.linalg.matrix_rank(m)) for x in jax.tree_util.tree_leaves(d)
                                  for m in x.reshape((-1,) + x.shape[-2:]))
    include = "q_proj|up_proj|o_proj|lm_head"
    res["analyze"] = {}
    for spec in (None, "data:2,fsdp:2"):
        name = spec or "one"
        s = report.analyze(report.AnalyzeConfig(ckpt_dir=ckpt, taus=(1e-7, 1e-4), include=include,
                                                out=os.path.join(tmp, "plots_" + name), progress=False,
                                                mesh=spec))
        csv_rows = open(os.path.join(tmp, "plots_" + name, "layer_ranks.csv")).read().splitlines()
        res["analyze"][name] = {"views": s["views"], "csv": csv_rows}
        if spec:
            m = parallel.make_mesh(spec)
            res["analyze"][name]["specs"] = {
                k: [list(a) if isinstance(a, tuple) else a for a in report.stack_sharding(np.shape(v), m).spec]
                for k, v in (("q", p0["layers"]["attn"]["q_proj"]["kernel"]),
                             ("o", p0["extra"]["layers"]["attn"]["o_proj"]["kernel"]),
                             ("head", p0["lm_head"]["kernel"]))}
    json.dump(res, open(os.path.join(tmp, "res.json"), "w"))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh4")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(tmp / "res.json"))


def test_score_file_on_a_mesh_equals_one_device(results):
    sc = results["score"]
    assert results["n_fsdp_leaves"] >= 2          # fsdp really splits some parameters
    one = sc["one"]
    assert [r["n_tokens"] for r in one] == [len(r["token_logprobs"]) for r in one]
    assert one[4]["split"] == "separate" and one[2]["n_tokens"] == 1
    for spec in ("data:2,fsdp:2", "data:4"):
        got = sc[spec]
        assert len(got) == len(one)               # padding rows are dropped
        for a, b in zip(got, one):
            assert {k: v for k, v in a.items() if k not in ("logprob", "token_logprobs")} == \
                   {k: v for k, v in b.items() if k not in ("logprob", "token_logprobs")}
            np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a["logprob"], b["logprob"], rtol=1e-5)


def test_analyze_on_a_mesh_equals_one_device(results):
    an = results["analyze"]
    assert an["data:2,fsdp:2"]["specs"] == {"q": [["data", "fsdp"]], "o": ["data"], "head": []}
    ref = an["one"]
    assert ref["views"]["tau=1e-07"]["final_size"] > 0
    ranks = sorted(int(line.split(",")[4]) for line in ref["csv"][1:])
    assert ranks == results["planted_ranks"] and len(ranks) == 4 + 4 + 2 + 1 and set(ranks) == {1, 2, 3}
    assert 0 < ref["views"]["exact"]["final_density_pct"] < 100
    for spec in ("data:2,fsdp:2",):
        got = an[spec]
        assert got["views"] == ref["views"]        # exact counts: densities, coverage, sizes
        assert len(got["csv"]) == len(ref["csv"]) and got["csv"][0] == ref["csv"][0]
        for a, b in zip(got["csv"][1:], ref["csv"][1:]):
            a, b = a.split(","), b.split(",")
            assert a[:5] == b[:5] and a[7] == b[7]             # layer, module, shape, rank; density
            np.testing.assert_allclose([float(x) for x in a[5:7]], [float(x) for x in b[5:7]], rtol=1e-6)


@pytest.mark.parametrize("launcher", ["launch.score", "launch.analyze"])
def test_bad_mesh_is_one_line_user_error(launcher, tmp_path):
    args = ([f"--texts_file={tmp_path / 'in.jsonl'}", f"--out={tmp_path / 'o.jsonl'}"]
            if launcher == "launch.score" else [f"--ckpt_dir={tmp_path}"])
    r = subprocess.run([sys.executable, "-m", launcher, "--mesh=data:3"] + args, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --mesh='data:3' needs 3 devices but 1 are visible")
    assert len(r.stderr.strip().splitlines()) == 1
