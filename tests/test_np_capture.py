"""NP replay from a hidden state captured during generation: decoder capture / start-from-block,
the sampler's `capture_layer`, the replay with `start_hidden`, and the ES trainer wiring."""
import csv
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse.generate import generate
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import (ActNoise, Block, forward, init_cache, init_params, map_layers, split_cache,
                                         split_layers, stack_layers)
from jaxrl_sparse.rl import es_math
from jaxrl_sparse.transforms import perturb

L = 3
CFGS = {
    "llama": ModelConfig("llama", 64, 16, 32, L, 2, 1, 8, tie_embeddings=False).validate(),
    "gemma2": ModelConfig("gemma2", 64, 16, 32, L, 2, 1, 8, sliding_window=3, attn_logit_softcap=50.0,
                          final_logit_softcap=30.0, query_pre_attn_scalar=8.0,
                          layer_types=("sliding_attention", "full_attention", "sliding_attention")).validate(),
    "gpt2": ModelConfig("gpt2", 64, 16, 32, L, 2, 2, 8, qkv_bias=True).validate(),
}
P, NEW = 5, 6   # prompt 5 -> bucket 8: the bucket padding is stripped from the capture


def _random_params(cfg, seed=0):
    """Random weights at the init shapes (numpy draws: no init compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray((0.0 if cfg.is_gemma else 1.0) + 0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray((0.02 if "bias" in name else 0.2) * rng.standard_normal(s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def models():
    return {k: (c, _random_params(c)) for k, c in CFGS.items()}


def _noise(cfg, rows, last_k, sites=("attn", "mlp"), head=0.0):
    lm = np.arange(cfg.num_layers) >= cfg.num_layers - last_k
    keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.arange(rows)))
    return ActNoise(keys, jnp.asarray(lm * 0.3 * ("attn" in sites), jnp.float32),
                    jnp.asarray(lm * 0.3 * ("mlp" in sites), jnp.float32), jnp.float32(head))


def _block_inputs(params, cfg, tokens, mask, noise):
    """Reference: [x [B, T, D] entering block l for l < L], from an interceptor on the per-layer path
    (layers are Python ints there). Call inside a jit."""
    seen = {}

    def icpt(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, Block) and ctx.method_name == "__call__":
            seen[int(args[1])] = args[0][0]
        return next_fun(*args, **kwargs)

    cache = split_cache(init_cache(cfg, tokens.shape[0], tokens.shape[1]))
    with nn.intercept_methods(icpt):
        forward(params, cfg, tokens, mask, cache=cache, noise=noise)
    return [seen[l] for l in range(cfg.num_layers)]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_forward_capture_and_start_from_block(models, family):
    """capture_layer returns the block's input; starting at block j from it gives the full forward's
    output: stacked weights (all L, or only [j, L) with an (L - j)-block cache) and the per-layer path."""
    cfg, params = models[family]
    B, T, j = 3, 7, 1
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    mask = jnp.ones((B, T), bool).at[0, :2].set(False)

    def everything(p, t, m):   # one compile per family
        ref = forward(p, cfg, t, m)
        cap = forward(p, cfg, t, m, capture_layer=j)
        h = cap.captured
        sliced = dict(p, layers=jax.tree_util.tree_map(lambda w: w[j:], p["layers"]))
        starts = [forward(sliced, cfg, t, m, start_layer=j, start_hidden=h, cache=init_cache(cfg, B, T, layers=L - j)),
                  forward(p, cfg, t, m, start_layer=j, start_hidden=h, cache=split_cache(init_cache(cfg, B, T)))]
        return ref, cap, starts, _block_inputs(p, cfg, t, m, None)

    ref, cap, starts, xs = jax.jit(everything)(params, tokens, mask)
    np.testing.assert_allclose(cap.logits, ref.logits, rtol=1e-6, atol=1e-6)   # the split changes nothing
    np.testing.assert_allclose(cap.captured, xs[j], rtol=1e-5, atol=1e-6)
    assert cap.captured.dtype == jnp.float32 and cap.captured.shape == (B, T, cfg.hidden_size)
    assert not np.allclose(xs[1], xs[2])
    for r in starts:
        np.testing.assert_allclose(r.hidden, ref.hidden, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert starts[0].cache["k"].shape[0] == L - j and len(starts[1].cache["k"]) == L
    with pytest.raises(ValueError, match="start_hidden"):
        forward(params, cfg, tokens, mask, start_layer=1)


def _prompts(cfg, lengths=(3, 5, 4, 5)):
    rng = np.random.default_rng(0)
    toks = rng.integers(3, cfg.vocab_size, (len(lengths), P)).astype(np.int32)
    mask = np.zeros((len(lengths), P), np.int32)
    for i, n in enumerate(lengths):
        mask[i, P - n:] = 1
    return np.where(mask == 1, toks, 0), mask


def test_generate_capture_equals_teacher_forced_block_input(models):
    """generate(capture_layer=j): the stream entering block j at every prompt slot and fed response
    token, equal to a teacher-forced forward over prompt + response; scan and per-layer decoding.
    Capturing changes no other output. (Generation with noise + capture: the slow ES test below.)"""
    cfg, params = models["llama"]
    toks, mask = _prompts(cfg)
    B, j = len(toks), 1
    ref_fn = jax.jit(lambda p, t, mm: forward(p, cfg, t, mm, capture_layer=j, compute_logits=False).captured)
    kw = dict(max_new_tokens=NEW, greedy=True, capture_layer=j)
    outs = []
    for layer_loop in (False, True):
        gen = lambda eos: generate(params, cfg, toks, mask, jax.random.key(2), layer_loop=layer_loop,
                                   eos_token_id=eos, **kw)   # eos ids are a runtime input: one compile
        first = np.asarray(gen([]).tokens)
        eos = [int(first[0, 2]), int(first[1, 1])]   # rows 0 and 1 stop early
        out = gen(eos)
        outs.append(out)
        assert int(np.asarray(out.lengths).min()) < NEW
        assert out.hidden.shape == (B, P + NEW, cfg.hidden_size)   # bucket padding (8 - P) stripped
        seq = np.concatenate([toks, np.asarray(out.tokens)], 1)
        m = np.concatenate([mask, np.asarray(out.mask)], 1)
        ref = ref_fn(params, seq, m)
        contrib = np.asarray(es_math.np_contrib_mask(mask, out.mask))   # every position the replay uses
        assert contrib.sum() > B * 3
        np.testing.assert_allclose(np.asarray(out.hidden)[contrib], np.asarray(ref)[contrib], rtol=1e-5, atol=1e-6)
        assert np.isfinite(np.asarray(out.hidden)).all()
    base = generate(params, cfg, toks, mask, jax.random.key(2), layer_loop=True, eos_token_id=eos,
                    **dict(kw, capture_layer=-1))
    assert base.hidden is None
    for x, y in zip(base[:6], outs[1][:6]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    from jaxrl_sparse.errors import UserError
    with pytest.raises(UserError, match="capture_layer"):
        generate(params, cfg, toks, mask, jax.random.key(2), **dict(kw, capture_layer=L))


@pytest.mark.parametrize("include,last_k,chunk", [("mlp", 2, 4), ("attn,mlp,head", 1, 8)])
def test_replay_from_captured_hidden_equals_full_replay(models, include, last_k, chunk):
    """np_replay_delta from the stream entering block L - last_k == the replay of every block."""
    cfg, params = models["llama"]
    R, S = 4, 8
    tokens = jax.random.randint(jax.random.key(3), (R, S), 0, cfg.vocab_size)
    mask = jnp.ones((R, S), bool).at[0, :2].set(False).at[1, -2:].set(False)   # left pad; a row that stopped
    contrib = mask.at[:, -1].set(False)
    scales = perturb.np_scales(cfg, include, last_k, 0.3)
    keys = _noise(cfg, R, last_k).keys
    coef = jnp.array([0.7, -1.1, 0.3, 2.0])
    j = L - last_k

    def both(p, t, m, c, k, w, sc):
        replay = lambda h: es_math.np_replay_delta(p, cfg, t, m, c, k, w, sc, include, last_k, tok_chunk=chunk,
                                                   micro_rows=2, start_hidden=h)
        # blocks < j carry no noise (scale 0 adds exactly 0): a noise-free pass gives generation's stream
        h = forward(p, cfg, t, m, capture_layer=j, compute_logits=False).captured
        return replay(None), replay(h)

    full, fast = jax.jit(both)(params, tokens, mask, contrib, keys, coef, scales)
    assert set(full) == set(fast) == set(tree_paths(params, include))
    for p in full:
        assert fast[p].shape == full[p].shape
        np.testing.assert_allclose(fast[p], full[p], rtol=1e-5, atol=1e-6 * float(np.abs(full[p]).max()))
        assert np.abs(full[p]).max() > 0
        if p.startswith("layers/"):   # blocks before L - last_k carry no noise: exactly zero
            assert not np.asarray(fast[p][:j]).any() and not np.asarray(full[p][:j]).any()
            assert np.abs(np.asarray(fast[p][j:])).max() > 0


def tree_paths(params, include):
    from jaxrl_sparse import tree as tree_lib
    return tree_lib.select(params, perturb.np_param_regex(CFGS["llama"], include), what="NP parameters")


def test_replay_start_hidden_needs_last_k(models):
    cfg, params = models["llama"]
    R, S = 2, 4
    z = jnp.zeros((R, S), bool)
    with pytest.raises(ValueError, match="last_k"):
        es_math.np_replay_delta(params, cfg, jnp.zeros((R, S), jnp.int32), ~z, z, jnp.zeros((R, 2), jnp.uint32),
                                jnp.ones(R), perturb.np_scales(cfg, "mlp", 0, 0.1), "mlp", 0,
                                start_hidden=jnp.zeros((R, S, cfg.hidden_size)))


def test_capture_layer_choice():
    from jaxrl_sparse.rl.es import np_capture_layer
    cfg = CFGS["llama"]
    assert np_capture_layer(cfg, "mlp", 1) == 2 and np_capture_layer(cfg, "attn,head", 2) == 1
    assert np_capture_layer(cfg, "mlp", 0) == -1          # every block perturbed: full replay
    assert np_capture_layer(cfg, "head", 1) == -1         # head only: unchanged
    assert np_capture_layer(cfg, "mlp", 1, capture=False) == -1


def test_lowrank_hook_applies_on_the_per_layer_path(models):
    """The per-layer path keeps the scanned module paths (`layers/...`, `lm_head`), so Dense
    interceptors such as low-rank WP perturb the per-layer (GPU decode) forward as the scanned one."""
    cfg, params = models["llama"]
    rng = np.random.default_rng(1)
    D, F, V, r = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, 2
    fac = {"layers/mlp/down_proj/kernel": (rng.standard_normal((2, L, F, r)), rng.standard_normal((2, L, D, r))),
           "lm_head/kernel": (rng.standard_normal((2, D, r)), rng.standard_normal((2, V, r)))}
    fac = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), fac)
    tokens = jax.random.randint(jax.random.key(1), (4, 5), 0, cfg.vocab_size)

    def run(p, fac, t):
        with perturb.lowrank_interceptor(fac, 0.5, 2):
            scan = forward(p, cfg, t).logits
            loop = forward(p, cfg, t, cache=split_cache(init_cache(cfg, 4, 5))).logits
        return scan, loop, forward(p, cfg, t).logits

    scan, loop, plain = jax.jit(run)(params, fac, tokens)
    np.testing.assert_allclose(loop, scan, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(scan) - np.asarray(plain)).max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_per_layer_weights_without_cache_equal_stacked(models, family):
    """forward with params['layers'] split per layer (the PPO update's layer loop) and no cache:
    the stacked forward's logits, left padding included; no cache comes back; map_layers +
    stack_layers restore the stacked tree exactly."""
    cfg, params = models[family]
    tokens = jax.random.randint(jax.random.key(2), (3, 6), 0, cfg.vocab_size)
    mask = jnp.asarray(np.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]), jnp.int32)
    split = map_layers(params, split_layers)
    assert isinstance(split["layers"], tuple) and len(split["layers"]) == cfg.num_layers
    out = jax.jit(lambda p: forward(p, cfg, tokens, mask))(split)
    ref = forward(params, cfg, tokens, mask)
    assert out.cache is None
    m = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(out.logits)[m], np.asarray(ref.logits)[m], rtol=1e-5, atol=1e-5)
    back = map_layers(split, stack_layers)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)))


def _token_rewards(tok, tokens, mask, golds, n_members):
    """Stand-in reward (the random tiny model never answers right, so z would be 0 and nothing move):
    the mean generated token id of every row, [N, M]."""
    t, m = np.asarray(tokens, np.float32), np.asarray(mask, np.float32)
    return ((t * m).sum(1) / np.maximum(m.sum(1), 1)).reshape(n_members, -1)


@pytest.mark.slow   # two ES runs: ~25 s on a 2-core CPU
def test_es_np_run_with_capture_equals_full_replay(tmp_path, monkeypatch):
    """ES NP with --last_k=1: the replay from the captured stream gives the same rewards and parameters."""
    from jaxrl_sparse.rl import es
    monkeypatch.setattr(es, "row_rewards", _token_rewards)
    loaded = es.tiny_random_model(0)
    base = es.ESConfig(method="np", np_include="mlp,head", last_k=1, model_name="tiny-random", mixed_precision="no",
                       data="generated", n_train=2, n_eval=2, n_iters=2, pop_size=2, sigma=0.5, alpha=0.05,
                       greedy=False, max_new_tokens=4, max_prompt_len=48, skip_eval=True, export_final=False)
    assert es.np_capture_layer(loaded[0], base.np_include, base.last_k) == loaded[0].num_layers - 1
    res = {}
    for cap in (True, False):
        d = tmp_path / f"cap{int(cap)}"
        res[cap] = es.train(dataclasses.replace(base, np_capture=cap, visualization_dir=str(d)), progress=False,
                            loaded=loaded)
        with open(d / "reward_history.csv") as f:
            res[cap]["rows"] = list(csv.DictReader(f))
    assert res[True]["rows"] == res[False]["rows"] and len(res[True]["rows"]) == 2 * 2
    for a, b in zip(jax.tree_util.tree_leaves(res[True]["params"]), jax.tree_util.tree_leaves(res[False]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = tree_diff(res[True]["params"], loaded[1])   # the update really ran (down_proj and the tied head)
    assert moved == {"layers/mlp/down_proj/kernel", "embed/embedding"}
    last = np.asarray(tree_flat(res[True]["params"])["layers/mlp/down_proj/kernel"]) - \
        np.asarray(tree_flat(loaded[1])["layers/mlp/down_proj/kernel"])
    assert not last[0].any() and last[1].any()   # only the last block


def tree_flat(params):
    from jaxrl_sparse import tree as tree_lib
    return tree_lib.flatten(params)


def tree_diff(a, b):
    fa, fb = tree_flat(a), tree_flat(b)
    return {p for p in fa if not np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))}


def test_inactive_noise_sites_are_not_drawn(models):
    """ActNoise built from concrete scales knows its nonzero sites (static aux data): the per-layer
    decode draws noise only there, with the same output as drawing it everywhere times 0."""
    cfg, params = models["llama"]
    toks, mask = _prompts(cfg)
    B = len(toks)
    noise = _noise(cfg, B, last_k=1, sites=("mlp",))
    assert noise.active == frozenset({("mlp", L - 1)}) and noise.first_noisy_layer(L) == L - 1
    unknown = noise.replace(active=None)
    assert unknown.first_noisy_layer(L) is None
    cache = split_cache(init_cache(cfg, B, P))

    def run(n):
        return forward(params, cfg, jnp.asarray(toks), jnp.asarray(mask), cache=cache, noise=n).logits

    draws = lambda n: str(jax.make_jaxpr(run)(n)).count("random_bits")
    assert 0 < draws(noise) < draws(unknown)
    np.testing.assert_array_equal(np.asarray(jax.jit(run)(noise)), np.asarray(jax.jit(run)(unknown)))
    # inside jit the scales are traced: unknown, noise everywhere (the replay's case)
    assert jax.jit(lambda a: ActNoise(noise.keys, a, a, a[0]).active is None and a)(noise.mlp_scale) is not None


def test_shared_prefill_equals_per_row_prefill(models):
    """A population of tiled prompts with noise in the last block only: blocks before it are
    prefilled once per distinct prompt (prompt_copies = 3) and tiled; tokens, log-probs and the
    captured stream equal the per-row prefill. (The prefill runs before the decode loop's layer
    split, so one decode path is enough.)"""
    layer_loop = True
    from jaxrl_sparse import generate as gen_mod
    cfg, params = models["gemma2"]   # sliding layers: the prefix model keeps its layer types
    toks, mask = _prompts(cfg)
    C = 3
    t, m = np.tile(toks, (C, 1)), np.tile(mask, (C, 1))
    assert gen_mod.prompt_copies(t, m) == C and gen_mod.prompt_copies(toks, mask) == 1
    noise = _noise(cfg, len(t), last_k=1)
    kw = dict(max_new_tokens=NEW, greedy=True, fixed_length=True, capture_layer=L - 1, layer_loop=layer_loop,
              noise=noise)
    spec, _, _ = gen_mod.prepare(params, cfg, t, m, jax.random.key(3), prefill_shared_layers=L, **kw)
    assert (spec.prompt_copies, spec.shared_layers) == (C, L - 1)   # lowered to the first noisy block
    shared = generate(params, cfg, t, m, jax.random.key(3), prefill_shared_layers=L, **kw)
    plain = generate(params, cfg, t, m, jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(plain.logprobs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(shared.hidden), np.asarray(plain.hidden), rtol=1e-5, atol=1e-5)
    # the members' noise differs, so their continuations do (the test can see a wrong tiling)
    rows = np.asarray(plain.tokens).reshape(C, len(toks), -1)
    assert not np.array_equal(rows[0], rows[1])
    # noise in every block: nothing to share
    spec, _, _ = gen_mod.prepare(params, cfg, t, m, jax.random.key(3), prefill_shared_layers=L,
                                 **dict(kw, noise=_noise(cfg, len(t), last_k=L)))
    assert spec.shared_layers == 0 and spec.prompt_copies == 1


def test_noise_off_in_prompt_matches_replay_with_start(models):
    """generate(noise_in_prompt=False): the prompt's forward runs clean, so every block but the last
    is shared across the tiled population, and the log-probs equal a teacher-forced forward whose
    noise starts at each row's prompt length (ActNoise.start, what the replay uses); noise on the
    prompt too gives other log-probs (the test sees a prefill that kept its noise)."""
    from jaxrl_sparse import generate as gen_mod
    cfg, params = models["llama"]
    toks, mask = _prompts(cfg)
    C = 2
    t, m = np.tile(toks, (C, 1)), np.tile(mask, (C, 1))
    noise = _noise(cfg, len(t), last_k=L, head=0.3)   # every block and the head
    kw = dict(max_new_tokens=NEW, greedy=True, fixed_length=True, noise=noise, prefill_shared_layers=L,
              layer_loop=False)
    spec, _, _ = gen_mod.prepare(params, cfg, t, m, jax.random.key(3), noise_in_prompt=False, **kw)
    assert (spec.prompt_copies, spec.shared_layers, spec.prefill_noise) == (C, L - 1, False)
    spec, _, _ = gen_mod.prepare(params, cfg, t, m, jax.random.key(3), noise_in_prompt=False, capture_layer=1, **kw)
    assert spec.shared_layers == 1   # the captured stream enters block 1: blocks from 1 on run per row
    out = generate(params, cfg, t, m, jax.random.key(3), noise_in_prompt=False, **kw)
    seq = np.concatenate([t, np.asarray(out.tokens)], 1)
    sm = np.concatenate([m, np.asarray(out.mask)], 1)
    start = jnp.asarray(m.sum(1), jnp.int32)
    fwd = jax.jit(lambda nz: forward(params, cfg, seq, sm, noise=nz).logits[:, P - 1:P - 1 + NEW])

    def logprobs(nz):
        lg = jax.nn.log_softmax(fwd(nz))
        return np.asarray(jnp.take_along_axis(lg, jnp.asarray(out.tokens)[..., None], -1)[..., 0])
    np.testing.assert_allclose(np.asarray(out.logprobs), logprobs(noise.replace(start=start)), atol=1e-4)
    assert np.abs(np.asarray(out.logprobs) - logprobs(noise)).max() > 1e-3
    rows = np.asarray(out.tokens).reshape(C, len(toks), -1)
    assert not np.array_equal(rows[0], rows[1])   # the decode steps still carry each row's noise


def test_noise_sign_flips_the_noise(models):
    """ActNoise.sign: with head noise only, logits = clean + sign * scale * eps exactly, so a row with
    sign -1 moves by the opposite of its +1 twin (antithetic NP pairs share the row key)."""
    cfg, params = models["llama"]
    toks, mask = _prompts(cfg)
    B = len(toks)
    noise = _noise(cfg, B, last_k=0, head=0.5)
    sign = jnp.asarray([1.0, -1.0, -1.0, 1.0])
    fwd = jax.jit(lambda nz: forward(params, cfg, toks, mask, noise=nz).logits)
    clean, plus, signed = fwd(None), fwd(noise), fwd(noise.replace(sign=sign))
    d_plus, d_signed = np.asarray(plus - clean), np.asarray(signed - clean)
    assert np.abs(d_plus).max() > 0.1
    np.testing.assert_allclose(d_signed, d_plus * np.asarray(sign)[:, None, None], rtol=1e-5, atol=1e-5)
