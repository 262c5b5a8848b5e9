"""Log-prob scoring: the math on hand-checkable inputs, the prompt seam, `launch.score` end to end
against transformers, launcher errors, and `launch.weight_shapes`."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_ref
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models import export_hf, load_model
from jaxrl_sparse.score import (bucket_length, encode_example, read_jsonl_texts, score_rows,
                                sequence_logprobs, token_logprobs)
from tiny_tokenizer import tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_token_logprobs_alignment():
    # row t predicts tokens[t + 1]: tokens[1] = 1 under row 0 (p=.25), tokens[2] = 0 under row 1 (p=.1)
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]], np.float32))
    logits = logits + 7.0  # unnormalised: only softmax(logits) matters
    lp = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray([[2, 1, 0]])))
    np.testing.assert_allclose(lp, np.log([[0.25, 0.1]]), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random llama with a real tokenizer, exported as a HF folder (our export path)."""
    d = tmp_path_factory.mktemp("tiny")
    model = hf_ref.random_hf_model("llama", seed=4)
    model.save_pretrained(d / "src", safe_serialization=True)
    src = load_model(str(d / "src"), with_tokenizer=False)
    tok = tiny_tokenizer()
    out = export_hf(str(d / "export"), src.config, src.params, tok)
    return model, out, load_model(out)


def _hf_logprobs(model, ids, start):
    import torch
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return np.array([float(lp[k - 1, ids[k]]) for k in range(start, len(ids))])


def test_encode_example_seam():
    tok = tiny_tokenizer()
    ids, start, mode = encode_example(tok, "I say the")
    assert ids[0] == tok.bos_token_id and start == 1 and mode == "joint"
    ids, start, mode = encode_example(tok, "the end", prompt="I say:")  # prompt tokens are a prefix
    assert mode == "joint" and ids[:start] == tok("I say:").input_ids
    ids, start, mode = encode_example(tok, "the", prompt="I say ")  # ' t' merges across the seam
    assert mode == "separate"
    assert ids[:start] == tok("I say").input_ids
    assert ids[start:] == tok(" the", add_special_tokens=False).input_ids


def test_sequence_logprobs_masks(tiny_lm):
    lm = tiny_lm[2]
    tokens = jnp.asarray([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6], jnp.int32)
    fn = jax.jit(sequence_logprobs, static_argnums=1)  # one compile for both calls
    lp = np.asarray(fn(lm.params, lm.config, tokens, mask))
    assert lp.shape == (2, 5)
    assert (lp[0, :2] == 0).all() and (lp[0, 2:] < 0).all() and (lp[1] < 0).all()
    loss = jnp.asarray([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])
    lp2 = np.asarray(fn(lm.params, lm.config, tokens, mask, loss))
    np.testing.assert_array_equal(lp2, np.where(np.asarray(loss)[:, 1:] == 1, lp, 0))
    assert bucket_length(1, 64) == 64 and bucket_length(65, 64) == 128


def test_launch_score_matches_transformers(tiny_lm, tmp_path):
    model, folder, _ = tiny_lm
    rows = [{"text": "The cat sat on the mat.", "id": 1},
            {"text": " the dog", "prompt": "Q: what? A:"},
            {"text": "the end", "prompt": "I say "},  # seam merge -> separate encoding
            {"text": "x"}]  # a single token after BOS
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "launch.score", f"--model={folder}", f"--texts_file={src}",
                        f"--out={out}", "--batch_size=3", "--bucket=16", "--noprogress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(rows) and got[0]["id"] == 1 and got[2]["split"] == "separate"
    tok = tiny_tokenizer()
    for row, g in zip(rows, got):
        ids, start, _ = encode_example(tok, row["text"], row.get("prompt"))
        ref = _hf_logprobs(model, ids, start)
        assert g["n_tokens"] == len(ref) == len(g["token_logprobs"])
        np.testing.assert_allclose(g["token_logprobs"], ref, atol=2e-4)
        assert abs(g["logprob"] - ref.sum()) < 1e-3
    assert got[3]["n_tokens"] == 1
    assert got[1]["n_tokens"] == len(tok(" the dog", add_special_tokens=False).input_ids)


def test_score_rows_in_process_batches_and_order(tiny_lm):
    lm = tiny_lm[2]
    rows = [{"text": "a" * n} for n in (3, 40, 1, 17, 9)]
    one = score_rows(lm, rows, batch_size=2, bucket=16, progress=False)
    each = [score_rows(lm, [r], batch_size=1, bucket=64, progress=False)[0] for r in rows]
    for a, b in zip(one, each):  # batching, padding and bucketing do not change results
        assert a["n_tokens"] == b["n_tokens"]
        np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=1e-4)


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl_texts(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 needs a string field \"text\""):
        read_jsonl_texts(str(bad))


def _run(args):
    return subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_launch_score_errors(tiny_lm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hi"}\n')
    r = _run(["launch.score", "--model=not-a-model", f"--texts_file={src}", f"--out={tmp_path / 'o.jsonl'}"])
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown model 'not-a-model'")
    assert len(r.stderr.strip().splitlines()) == 1
    # partial shards: the index names a file that is gone
    import shutil
    folder = tmp_path / "partial"
    hf_ref.random_hf_model("llama").save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    shard = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))[0]
    os.remove(folder / shard)
    shutil.copy(src, tmp_path / "in2.jsonl")
    r = _run(["launch.score", f"--model={folder}", f"--texts_file={tmp_path / 'in2.jsonl'}",
              f"--out={tmp_path / 'o.jsonl'}"])
    assert r.returncode == 2 and "missing shard" in r.stderr and shard in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_weight_shapes_gpt2_medium_offline():
    r = _run(["launch.weight_shapes", "--model=gpt2-medium"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shapes only (no weights)" in r.stdout
    assert "total" in r.stdout and "354,823,168" in r.stdout.split("total")[-1]
    assert "transformer.h.{i}.mlp.c_fc.weight (x 24)" in r.stdout
    r = _run(["launch.weight_shapes", "--model=gpt2-medium", "--hf_names"])
    assert r.returncode == 0 and "transformer.h.{i}.attn.c_proj.weight" in r.stdout


@pytest.mark.parametrize("family", ["gpt2", "llama_untied", "qwen2", "gemma2", "gemma3"])
def test_score_rows_match_transformers_every_family(family, tmp_path):
    """`score_rows` (what launch.score runs) on a HF folder of each family equals transformers."""
    model = hf_ref.random_hf_model(family, seed=5)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "src")
    lm = load_model(str(tmp_path / "src"))
    rows = [{"text": "The cat sat on the mat."}, {"text": " the dog", "prompt": "Q: what? A:"}]
    got = score_rows(lm, rows, batch_size=2, bucket=16, progress=False)
    for row, g in zip(rows, got):
        ids, start, _ = encode_example(lm.tokenizer, row["text"], row.get("prompt"))
        ref = _hf_logprobs(model, ids, start)
        np.testing.assert_allclose(g["token_logprobs"], ref, atol=2e-4)
