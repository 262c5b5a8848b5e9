"""The jitted KV-cache sampler against transformers' generate and a teacher-forced forward pass."""
import os
import re
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from hf_ref import random_hf_model, state_numpy
from jaxrl_sparse import sampling
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.generate import bucket_length, generate
from jaxrl_sparse.models.config import from_hf_config
from jaxrl_sparse.models.convert import hf_to_params
from jaxrl_sparse.models.decoder import ActNoise, forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, P, N = 3, 7, 10


def _model(family):
    hf = random_hf_model(family)
    cfg = from_hf_config(hf.config.to_dict())
    params = jax.tree_util.tree_map(jnp.asarray, hf_to_params(cfg, state_numpy(hf)))
    return hf, cfg, params


def _prompts(vocab, lengths=(4, 7, 6), seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, vocab, (len(lengths), P)).astype(np.int32)
    mask = np.zeros((len(lengths), P), np.int32)
    for i, n in enumerate(lengths):
        mask[i, P - n:] = 1
    return np.where(mask == 1, toks, 0), mask


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


def _greedy(params, cfg, toks, mask, **kw):
    kw = dict(dict(max_new_tokens=N, greedy=True, eos_token_id=[]), **kw)
    return generate(params, cfg, toks, mask, jax.random.key(0), **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma2", "gemma3"])
def test_greedy_matches_transformers(family):
    """Left-padded prompts of different lengths: same continuation as HF greedy generate."""
    import torch
    hf, cfg, params = _model(family)
    toks, mask = _prompts(cfg.vocab_size)
    out = _greedy(params, cfg, toks, mask)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=N, min_new_tokens=N, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, P:].numpy())
    assert np.asarray(out.mask).all() and int(out.n_steps) == N


def _teacher_forced(params, cfg, toks, mask, out, noise=None):
    seq = np.concatenate([toks, np.asarray(out.tokens)], axis=1)
    m = np.concatenate([mask, np.asarray(out.mask)], axis=1)
    fwd = jax.jit(lambda p, s, m, n: forward(p, cfg, s, m, noise=n).logits)
    logits = fwd(params, jnp.asarray(seq), jnp.asarray(m), noise)
    return logits[:, P - 1:P - 1 + N]  # logits predicting response token t


def test_logprobs_equal_teacher_forced_pass_with_noise(llama):
    """Raw and sampling log-probs are those of a teacher-forced forward over prompt + response,
    with activation noise on (its eps is keyed by absolute position, so the replay matches)."""
    _, cfg, params = llama
    toks, mask = _prompts(cfg.vocab_size)
    L = cfg.num_layers
    noise = ActNoise(jax.random.key_data(jax.random.split(jax.random.key(5), B)),
                     jnp.full((L,), 0.3), jnp.linspace(0.1, 0.5, L), jnp.asarray(0.2))
    kw = dict(temperature=0.7, top_k=20, top_p=0.9, min_new_tokens=3)
    first = _greedy(params, cfg, toks, mask)
    eos = int(np.asarray(first.tokens)[0, 4])  # a token the model likes: some rows stop early
    out = generate(params, cfg, toks, mask, jax.random.key(1), max_new_tokens=N, eos_token_id=eos,
                   noise=noise, **kw)
    m = np.asarray(out.mask)
    assert m[:, :3].all()  # min_new_tokens
    logits = _teacher_forced(params, cfg, toks, mask, out, noise)
    tok = jnp.asarray(out.tokens)
    lp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits), tok[..., None], -1)[..., 0])
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], lp[m], atol=1e-4)
    steps = jnp.arange(N)[None, :, None]
    masked = jnp.where((steps < 3) & (jnp.arange(cfg.vocab_size) == eos), -jnp.inf, logits)
    proc = sampling.processed_logits(masked.reshape(B * N, -1), temperature=0.7, top_k=20, top_p=0.9)
    slp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(proc), tok.reshape(-1, 1), -1)).reshape(B, N)
    np.testing.assert_allclose(np.asarray(out.sample_logprobs)[m], slp[m], atol=1e-4)
    assert (np.asarray(out.sample_logprobs)[m] > np.asarray(out.logprobs)[m] - 1e-4).all()  # filtering
    # masked-out slots are zero / pad
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    assert (np.asarray(out.logprobs)[~m] == 0).all() and (np.asarray(out.tokens)[~m] == pad).all()
    # deterministic for a key; another key changes the sample
    again = generate(params, cfg, toks, mask, jax.random.key(1), max_new_tokens=N, eos_token_id=eos,
                     noise=noise, **kw)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    other = generate(params, cfg, toks, mask, jax.random.key(2), max_new_tokens=N, eos_token_id=eos,
                     noise=noise, **kw)
    assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any()


def test_top_k1_equals_greedy_and_eos_stops_rows(llama):
    _, cfg, params = llama
    toks, mask = _prompts(cfg.vocab_size)
    ref = np.asarray(_greedy(params, cfg, toks, mask).tokens)
    k1 = generate(params, cfg, toks, mask, jax.random.key(9), max_new_tokens=N, top_k=1, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(k1.tokens), ref)

    # EOS = every token greedy emits at step 1: each row stops at its first EOS, n_steps < N
    eos = sorted(set(ref[:, 1].tolist()))
    out = _greedy(params, cfg, toks, mask, eos_token_id=eos, pad_token_id=1)
    got, m = np.asarray(out.tokens), np.asarray(out.mask)
    for b in range(B):
        stop = min(i for i in range(N) if ref[b, i] in eos) + 1
        assert int(out.lengths[b]) == stop <= 2
        np.testing.assert_array_equal(got[b, :stop], ref[b, :stop])
        assert m[b, :stop].all() and not m[b, stop:].any() and (got[b, stop:] == 1).all()
    assert int(out.n_steps) == max(int(x) for x in out.lengths) < N

    # min_new_tokens: the same EOS set cannot end a row before 5 tokens
    out = _greedy(params, cfg, toks, mask, eos_token_id=eos, min_new_tokens=5)
    got = np.asarray(out.tokens)
    assert (np.asarray(out.lengths) >= 5).all()
    assert not np.isin(got[:, :5], eos).any()


def test_params_fn_bucketing_and_errors(llama):
    _, cfg, params = llama
    toks, mask = _prompts(cfg.vocab_size)
    scale = lambda p: jax.tree_util.tree_map(lambda x: x * 1.5, p)  # noqa: E731
    a = _greedy(params, cfg, toks, mask, params_fn=scale)
    b = _greedy(scale(params), cfg, toks, mask)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(_greedy(params, cfg, toks, mask).tokens)).any()
    # extra left padding (same bucket, so no recompile) changes nothing
    pt, pm = np.pad(toks, ((0, 0), (1, 0))), np.pad(mask, ((0, 0), (1, 0)))
    np.testing.assert_array_equal(np.asarray(_greedy(params, cfg, pt, pm).tokens),
                                  np.asarray(_greedy(params, cfg, toks, mask).tokens))
    assert [bucket_length(p) for p in (1, 8, 9, 64, 65, 130)] == [8, 8, 16, 64, 128, 192]
    bad = mask.copy()
    bad[0] = 0
    with pytest.raises(UserError, match="no tokens"):
        _greedy(params, cfg, toks, bad)
    with pytest.raises(UserError, match="left-padded"):
        _greedy(params, cfg, toks, mask[:, ::-1])
    with pytest.raises(UserError, match="top_p"):
        _greedy(params, cfg, toks, mask, top_p=1.5)


SHARDED = r"""
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import numpy as np, jax
from jax.sharding import Mesh
from test_generate import _prompts
from jaxrl_sparse.generate import generate
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import init_params
assert jax.device_count() == 4
cfg = ModelConfig("qwen2", 96, 32, 48, 2, 4, 2, 8, qkv_bias=True)
params = init_params(cfg, jax.random.key(0))
toks, mask = _prompts(cfg.vocab_size, lengths=(4, 7, 6, 2, 5, 7, 1, 3))
kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, eos_token_id=[5, 7])
one = generate(params, cfg, toks, mask, jax.random.key(3), mesh=False, **kw)
four = generate(params, cfg, toks, mask, jax.random.key(3), mesh=Mesh(np.array(jax.devices()), ("data",)), **kw)
assert len(four.tokens.sharding.device_set) == 4, four.tokens.sharding
dflt = generate(params, cfg, toks, mask, jax.random.key(3), **kw)  # default mesh: all 4 devices
for o in (four, dflt):
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(o.tokens))
    np.testing.assert_array_equal(np.asarray(one.mask), np.asarray(o.mask))
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(o.logprobs), atol=1e-5)
assert len(set(np.asarray(one.tokens).ravel().tolist())) > 4  # really sampled
print("SHARDED_OK")
"""


def test_sharded_over_four_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = SHARDED.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_tokenizer import tiny_tokenizer
    path = tmp_path_factory.mktemp("tiny_llama")
    random_hf_model("llama").save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_cli_end_to_end(tiny_folder, tmp_path, capsys):
    import json
    from launch.generate import GenerateConfig, run
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "the cat", "id": 1}\n\n{"prompt": "I say hello to the"}\n{"prompt": "a"}\n')
    out = tmp_path / "out.jsonl"
    cfg = GenerateConfig(model=tiny_folder, prompts_file=str(src), out=str(out), greedy=True,
                         max_new_tokens=N, batch_size=2, chat=True)
    rows = run(cfg)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == rows and len(lines) == 3 and lines[0]["id"] == 1
    assert [r["prompt"] for r in lines] == ["the cat", "I say hello to the", "a"]
    assert all(isinstance(r["completion"], str) for r in lines)
    # the completion is the greedy continuation of the chat-formatted prompt, decoded
    lm_tok = __import__("jaxrl_sparse.models", fromlist=["load_model"]).load_model(tiny_folder)
    text = lm_tok.tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                                add_generation_prompt=True)
    enc = lm_tok.tokenizer([text], return_tensors="np", add_special_tokens=False)
    ref = generate(lm_tok.params, lm_tok.config, enc["input_ids"], enc["attention_mask"], jax.random.key(0),
                   max_new_tokens=N, greedy=True, eos_token_id=lm_tok.tokenizer.eos_token_id)
    keep = [int(t) for t, m in zip(np.asarray(ref.tokens)[0], np.asarray(ref.mask)[0])
            if m and t != lm_tok.tokenizer.eos_token_id]
    assert lines[2]["completion"] == lm_tok.tokenizer.decode(keep, skip_special_tokens=True)
    # a single --prompt prints its completion
    capsys.readouterr()
    run(GenerateConfig(model=tiny_folder, prompt="the", max_new_tokens=4, seed=1))
    assert capsys.readouterr().out.strip() != ""


def test_cli_errors(tiny_folder, tmp_path):
    from launch.generate import GenerateConfig, run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n')
    cases = [(dict(prompts_file=str(tmp_path / "missing.jsonl")), "does not exist"),
             (dict(prompts_file=str(bad)), r"bad.jsonl:2 is not valid JSON"),
             (dict(prompts_file=str(nofield)), 'needs a string "prompt"'),
             (dict(prompt="x", top_p=1.5), "top_p"), (dict(prompt="x", temperature=-1.0), "temperature"),
             (dict(prompt="x", top_k=-2), "top_k"), (dict(prompt="x", prompts_file=str(bad)), "exactly one"),
             (dict(prompt="x", max_new_tokens=4, min_new_tokens=9), "min_new_tokens")]
    for kw, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            run(GenerateConfig(**dict(dict(model=tiny_folder), **kw)))
    # the launcher turns a UserError into one line on stderr and exit status 2
    r = subprocess.run([sys.executable, "-m", "launch.generate", "--prompt=hi", "--top_p=1.5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --top_p=1.5 must be in (0, 1]"]


def test_steps_per_sync_gives_identical_results(llama):
    """Several decode steps per while-loop iteration change nothing but the loop structure."""
    _, cfg, params = llama
    toks, mask = _prompts(cfg.vocab_size)
    for kw in (dict(eos_token_id=[]), dict(eos_token_id=[5, 9, 17], min_new_tokens=2)):
        one = generate(params, cfg, toks, mask, jax.random.key(3), max_new_tokens=N, **kw)
        three = generate(params, cfg, toks, mask, jax.random.key(3), max_new_tokens=N, steps_per_sync=3, **kw)
        for a, b in zip(one, three):
            if a is not None:  # GenerateOutput.hidden: None without capture_layer
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2"])  # sliding window, softcaps, post-norms
def test_layer_loop_decoding_equals_layer_scan(family):
    """Per-layer weights + KV buffers (the accelerator default) give the scan path's tokens and log-probs."""
    _, cfg, params = _model(family)
    toks, mask = _prompts(cfg.vocab_size)
    noise = ActNoise(jax.random.key_data(jax.random.split(jax.random.key(5), B)),
                     jnp.full((cfg.num_layers,), 0.01), jnp.zeros((cfg.num_layers,)), jnp.float32(0.0))
    outs = [generate(params, cfg, toks, mask, jax.random.key(3), max_new_tokens=N, top_k=5, top_p=0.9,
                     eos_token_id=[], steps_per_sync=2, noise=noise, layer_loop=ll) for ll in (False, True)]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-6)
    np.testing.assert_allclose(np.asarray(outs[0].sample_logprobs), np.asarray(outs[1].sample_logprobs), atol=1e-6)


def test_fixed_length_runs_a_counted_loop_and_per_layer_weights_decode_alike(llama):
    """fixed_length decodes in a loop with a compile-time trip count (XLA runs it with no
    device->host read of the loop condition per step) and gives the while loop's samples; per-layer
    weights as PPO's update carry holds them (`LayerSplit`, q/k/v and gate/up joined) give the
    stacked weights' tokens and log-probs, prompt included, with or without EOS stops."""
    from jaxrl_sparse.generate import compiled_sampler, prepare
    from jaxrl_sparse.models.decoder import LayerSplit
    from jaxrl_sparse.rl.ppo import update_carry
    _, cfg, params = llama
    toks, mask = _prompts(cfg.vocab_size)
    kw = dict(max_new_tokens=N, top_k=5, top_p=0.9, eos_token_id=[])

    def trip_counts(fixed_length, K):
        spec, mesh, args = prepare(params, cfg, toks, mask, jax.random.key(3), fixed_length=fixed_length,
                                   steps_per_sync=K, **kw)
        hlo = compiled_sampler(cfg, spec, None, mesh).lower(*args).compile().as_text()
        loops = [ln for ln in hlo.splitlines() if 'op_name="jit(run_traced)/while"' in ln and " while(" in ln]
        assert len(loops) == 1, len(loops)
        return [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', loops[0])]

    assert trip_counts(True, 1) == [N - 1] and trip_counts(True, 3) == [3]  # steps 1..N-1, K per iteration
    assert trip_counts(False, 1) == []                                      # EOS can end it early
    carried = update_carry(cfg, small_below=100)
    cp = dict(params, layers=carried.to_carry({"layers": params["layers"]})["layers"])
    assert isinstance(cp["layers"], LayerSplit) and "qkv_proj" in cp["layers"].big[0]["attn"]
    for stop in (dict(eos_token_id=[]), dict(eos_token_id=[5, 9, 17], min_new_tokens=2)):
        ref = generate(params, cfg, toks, mask, jax.random.key(3), **dict(kw, **stop))
        for p, fixed in ((params, True), (cp, False), (cp, True)):
            if fixed and stop["eos_token_id"]:
                continue  # fixed_length ignores EOS stops
            out = generate(p, cfg, toks, mask, jax.random.key(3), fixed_length=fixed, **dict(kw, **stop))
            np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
            np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
            np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
