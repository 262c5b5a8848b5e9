"""ES: WP / low-rank WP / NP update formulas, noise regeneration, site selection, end-to-end run."""
import csv
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse import tree as tree_lib
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import NOISE_SITES, ActNoise, Block, act_noise_value, forward, init_params
from jaxrl_sparse.rl import es_math
from jaxrl_sparse.transforms import perturb

CFG = ModelConfig("llama", 64, 16, 32, 2, 2, 1, 8, tie_embeddings=False).validate()


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def test_wp_update_matches_formula_and_noise_regenerates(params):
    paths = perturb.leaf_paths(params, r"layers/mlp|lm_head")
    keys = es_math.member_keys(jax.random.key(1), np.array([5, 9, 12], np.uint32))
    coefs = jnp.array([1.5, -0.5, 0.25])
    sgd = lambda p, k, c: es_math.optimizer_step(p, es_math.wp_delta(p, k, c, paths), {}, optimizer="sgd", alpha=0.1)[0]
    new = jax.jit(sgd)(params, keys, coefs)
    flat, fnew = tree_lib.flatten(params), tree_lib.flatten(new)
    noise = jax.jit(lambda k: perturb.weight_noise(params, k, paths))
    eps = [noise(keys[n]) for n in range(3)]
    eps_again = [noise(es_math.member_keys(jax.random.key(1), np.array([s], np.uint32))[0]) for s in (5, 9, 12)]
    for p in flat:
        if p in paths:
            want = flat[p] + 0.1 / 3 * sum(float(coefs[n]) * eps[n][p] for n in range(3))
            np.testing.assert_allclose(fnew[p], want, rtol=1e-5, atol=1e-6)
            assert not np.allclose(fnew[p], flat[p])
            for n in range(3):  # regenerated from the seed alone: bit-identical
                assert np.array_equal(np.asarray(eps[n][p]), np.asarray(eps_again[n][p]))
        else:
            assert np.array_equal(fnew[p], flat[p])
    # the perturbed member is theta + sigma eps, the master untouched
    pert = tree_lib.flatten(jax.jit(lambda k: perturb.perturbed_params(params, k, 0.01, paths))(keys[0]))
    p0 = paths[0]
    np.testing.assert_allclose(pert[p0], flat[p0] + 0.01 * eps[0][p0], rtol=1e-6, atol=1e-8)


def test_iteration_seeds_antithetic_and_zscore():
    s, sg = es_math.iteration_seeds(jax.random.key(0), 3, 6, antithetic=True)
    assert list(s[0::2]) == list(s[1::2]) and list(sg) == [1, -1] * 3
    s2, _ = es_math.iteration_seeds(jax.random.key(0), 3, 6, antithetic=True)
    assert np.array_equal(s, s2)
    z = np.asarray(es_math.zscore([0.0, 1.0, 1.0, 2.0]))
    np.testing.assert_allclose(z, (np.array([0, 1, 1, 2]) - 1) / np.std([0, 1, 1, 2]), rtol=1e-6)
    assert np.all(np.asarray(es_math.zscore([0.5, 0.5])) == 0)


def test_row_advantages_centre_per_prompt():
    r = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])   # [N=4, M=3]
    a = np.asarray(es_math.row_advantages(r))
    c = np.array([[0.5, 0, 0], [-0.5, 0, 0], [-0.5, 0, 0], [0.5, 0, 0]])   # prompt means 0.5, 0, 1
    np.testing.assert_allclose(a, c / np.sqrt((c ** 2).mean()), rtol=1e-6)
    assert not a[:, 1:].any()   # prompts every member answers alike carry no weight
    assert not np.asarray(es_math.row_advantages(np.ones((3, 2)))).any()


@pytest.mark.parametrize("credit,antithetic", [("member", False), ("row", False), ("member", True)])
def test_np_credit_sets_replay_row_weights(tmp_path, monkeypatch, credit, antithetic):
    """--np_credit: the replay's per-row weights are z_n / (N sigma) repeated over member n's rows
    (the seed's), or the per-prompt-centred row rewards (rows of prompts all members answer alike get 0).
    --antithetic: the pair's rows carry signs +1 / -1 into generation and the replay (not into z)."""
    from jaxrl_sparse.rl import es
    N, M, alpha, sigma = 2, 3, 0.05, 0.5
    r = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], np.float32)   # member 0 alone answers prompt 0
    monkeypatch.setattr(es, "row_rewards", lambda *a, **k: r)
    seen = []
    real = es._replay_fn

    def spy(*a, **k):
        fn = real(*a, **k)

        def wrapped(*args):
            seen.append(np.asarray(args[5]))
            seen.append(None if len(args) < 10 or args[9] is None else np.asarray(args[9]))
            return fn(*args)
        return wrapped
    monkeypatch.setattr(es, "_replay_fn", spy)
    cfg = es.ESConfig(method="np", np_include="mlp", np_credit=credit, model_name="tiny-random", mixed_precision="no",
                      data="generated", n_train=M, n_eval=2, n_iters=1, pop_size=N, sigma=sigma, alpha=alpha,
                      greedy=False, max_new_tokens=3, max_prompt_len=48, skip_eval=True, export_final=False,
                      visualization_dir=str(tmp_path), antithetic=antithetic)
    es.train(cfg, progress=False, loaded=es.tiny_random_model(0))
    if antithetic:
        np.testing.assert_array_equal(seen[1], [1.0] * M + [-1.0] * M)
    else:
        assert seen[1] is None
    z = np.repeat(np.asarray(es_math.zscore(r.mean(1))), M) if credit == "member" else \
        np.asarray(es_math.row_advantages(r)).reshape(-1)
    np.testing.assert_allclose(seen[0], z / (N * sigma), rtol=1e-6)
    assert (np.count_nonzero(seen[0]) == 2) == (credit == "row")


def test_adam_optimizer_step_matches_the_formula_over_two_steps(params):
    """--optimizer=adam: theta += alpha m_hat / (sqrt(v_hat) + eps), moments and bias correction as
    written by hand; the direction's units do not matter (1000 g gives the same steps)."""
    paths = ["layers/mlp/down_proj/kernel", "lm_head/kernel"]
    flat = tree_lib.flatten(params)
    g1 = {p: jax.random.normal(jax.random.key(i), flat[p].shape) for i, p in enumerate(paths)}
    g2 = {p: jax.random.normal(jax.random.key(9 + i), flat[p].shape) for i, p in enumerate(paths)}
    b1, b2, alpha = 0.8, 0.95, 0.01
    step = jax.jit(lambda p, g, s: es_math.optimizer_step(p, g, s, optimizer="adam", alpha=alpha, b1=b1, b2=b2))
    p1, s1 = step(params, g1, es_math.optimizer_init("adam", g1))
    p2, s2 = step(p1, g2, s1)
    assert int(s2["count"]) == 2
    for p in paths:
        a, b = np.asarray(g1[p], np.float64), np.asarray(g2[p], np.float64)
        m1, v1 = (1 - b1) * a, (1 - b2) * a * a
        want1 = np.asarray(flat[p], np.float64) + alpha * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + 1e-8)
        m2, v2 = b1 * m1 + (1 - b1) * b, b2 * v1 + (1 - b2) * b * b
        want2 = want1 + alpha * (m2 / (1 - b1 ** 2)) / (np.sqrt(v2 / (1 - b2 ** 2)) + 1e-8)
        np.testing.assert_allclose(tree_lib.flatten(p1)[p], want1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tree_lib.flatten(p2)[p], want2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s2["mu"][p], m2, rtol=1e-5, atol=1e-6)
        # first step: |step| = alpha on every coordinate, whatever the scale of g
        np.testing.assert_allclose(np.abs(np.asarray(tree_lib.flatten(p1)[p]) - flat[p]), alpha, rtol=1e-3)
    big = {p: 1000.0 * g for p, g in g1.items()}
    q1, _ = step(params, big, es_math.optimizer_init("adam", big))
    for p in paths:
        np.testing.assert_allclose(tree_lib.flatten(q1)[p], tree_lib.flatten(p1)[p], rtol=0, atol=1e-5)  # eps aside
    untouched = [p for p in flat if p not in paths]
    assert all(np.array_equal(tree_lib.flatten(p2)[p], flat[p]) for p in untouched)


def test_lowrank_update_and_hook_match_explicit_weights(params):
    paths = perturb.lowrank_paths(params, "")
    assert "layers/attn/q_proj/kernel" in paths and "lm_head/kernel" in paths
    assert all(p.endswith("kernel") for p in paths)
    keys = es_math.member_keys(jax.random.key(2), np.array([3, 4], np.uint32))
    coefs = jnp.array([1.0, -2.0])
    r, sigma = 2, 0.3
    step = lambda p, k, c: es_math.optimizer_step(p, es_math.lowrank_delta(p, k, c, paths, r), {}, optimizer="sgd",
                                                  alpha=0.5)[0]
    new = tree_lib.flatten(jax.jit(step)(params, keys, coefs))
    fac = [jax.jit(lambda k: perturb.lowrank_factors(params, k, paths, r))(keys[n]) for n in range(2)]
    flat = tree_lib.flatten(params)
    for p in paths:
        d = sum(float(coefs[n]) * perturb.lowrank_delta(*fac[n][p]) for n in range(2))
        np.testing.assert_allclose(new[p], flat[p] + 0.5 / 2 * d, rtol=1e-5, atol=1e-6)
    # hook: member n's rows decode with W + sigma A_n B_n^T / sqrt(r), all members in one batch
    tokens = jnp.array([[3, 5, 7, 9], [3, 5, 7, 9], [1, 2, 3, 4], [1, 2, 3, 4]])  # member-major, M=2
    def hooked(p, k, t):
        allfac = perturb.population_lowrank_factors(p, k, paths, r)
        with perturb.lowrank_interceptor(allfac, sigma, 2):
            return forward(p, CFG, t).logits

    got = jax.jit(hooked)(params, keys, tokens)
    fwd = jax.jit(lambda p, t: forward(p, CFG, t).logits)
    for n in range(2):
        merged = dict(flat)
        for p in paths:
            merged[p] = flat[p] + sigma * perturb.lowrank_delta(*fac[n][p])
        want = fwd(tree_lib.unflatten(merged), tokens[2 * n:2 * n + 2])
        np.testing.assert_allclose(got[2 * n:2 * n + 2], want, rtol=2e-4, atol=2e-5)


def _capture_inputs(params, tokens, mask, noise):
    """Forward with noise; returns {(site, layer): x [R, T, in]} captured at o_proj / down_proj."""
    store = {}
    state = {"layer": None}
    sites = {("layers", "attn", "o_proj"): "attn", ("layers", "mlp", "down_proj"): "mlp"}

    def icpt(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, Block) and ctx.method_name == "__call__":
            old, state["layer"] = state["layer"], args[1]
            try:
                return next_fun(*args, **kwargs)
            finally:
                state["layer"] = old
        if isinstance(ctx.module, nn.Dense) and tuple(ctx.module.path) in sites:
            site = sites[tuple(ctx.module.path)]
            jax.debug.callback(lambda l, x, s=site: store.__setitem__((s, int(l)), np.asarray(x)),
                               state["layer"], args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
        out = forward(params, CFG, tokens, mask, noise=noise)
    jax.effects_barrier()
    return store, np.asarray(out.hidden)


@pytest.mark.parametrize("noise_start,noise_sign", [(None, None), ((3, 1, 4, 2), None), (None, (1, -1, -1, 1))])
def test_np_replay_equals_sum_z_eps_xT(params, noise_start, noise_sign):
    """noise_start: noise (and the update) only from each row's given position on, as after a
    generation with noise_in_prompt=False. noise_sign: antithetic rows decoded with -eps."""
    include, last_k = "attn,mlp,head", 1
    R, S = 4, 7
    tokens = jax.random.randint(jax.random.key(3), (R, S), 0, 64)
    mask = jnp.ones((R, S), bool).at[0, :2].set(False)           # row 0 left-padded
    contrib = mask.at[:, -1].set(False)
    pos = np.maximum(np.cumsum(np.asarray(mask), 1) - 1, 0)
    if noise_start is not None:
        noise_start = jnp.asarray(noise_start, jnp.int32)
        contrib = contrib & jnp.asarray(pos >= np.asarray(noise_start)[:, None])
    keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.arange(R)))
    coef = jnp.array([0.7, -1.1, 0.3, 2.0])
    scales = perturb.np_scales(CFG, include, last_k, 0.05)
    sign = None if noise_sign is None else jnp.asarray(noise_sign, jnp.float32)
    delta = jax.jit(lambda p, t, m, c, k, w, s, n0, sg: es_math.np_replay_delta(
        p, CFG, t, m, c, k, w, s, include, last_k, tok_chunk=3, micro_rows=2, noise_start=n0, noise_sign=sg))(
        params, tokens, mask, contrib, keys, coef, scales, noise_start, sign)
    xs, hidden = _capture_inputs(params, tokens, mask, ActNoise(keys, *scales, start=noise_start, sign=sign))
    if noise_start is not None or sign is not None:   # the replayed stream differs from plain +eps everywhere
        full, _ = _capture_inputs(params, tokens, mask, ActNoise(keys, *scales))
        assert not np.allclose(full[("mlp", 1)], xs[("mlp", 1)])
    w = np.asarray(contrib, np.float32) * np.asarray(coef)[:, None]
    if sign is not None:   # the rows' noise was sign * eps
        w = w * np.asarray(sign)[:, None]
    expect_paths = set(tree_lib.select(params, perturb.np_param_regex(CFG, include)))
    assert set(delta) == expect_paths
    layer_on = np.asarray(perturb.np_layer_mask(CFG, last_k))
    for site, path in (("attn", "layers/attn/o_proj/kernel"), ("mlp", "layers/mlp/down_proj/kernel")):
        if path not in delta:
            continue
        for layer in range(CFG.num_layers):
            x = xs[(site, layer)]
            eps = np.stack([np.asarray(act_noise_value(keys[b], NOISE_SITES[site], layer, pos[b], CFG.hidden_size))
                            for b in range(R)])
            want = np.einsum("bt,bti,bto->io", w, x, eps) if layer_on[layer] else np.zeros_like(delta[path][layer])
            np.testing.assert_allclose(delta[path][layer], want, rtol=2e-4, atol=1e-6)
            assert np.abs(want).max() > 0 or not layer_on[layer]
    # last_k=1: the first block runs clean (its module inputs equal a noise-free pass), the second
    # block's attention output is noisy, so its MLP input differs
    clean, _ = _capture_inputs(params, tokens, mask, None)
    np.testing.assert_array_equal(clean[("attn", 0)], xs[("attn", 0)])
    np.testing.assert_array_equal(clean[("mlp", 0)], xs[("mlp", 0)])
    np.testing.assert_array_equal(clean[("attn", 1)], xs[("attn", 1)])
    assert not np.allclose(clean[("mlp", 1)], xs[("mlp", 1)])
    if "lm_head/kernel" in delta:
        eps = np.stack([np.asarray(act_noise_value(keys[b], 2, 0, pos[b], CFG.vocab_size)) for b in range(R)])
        want = np.einsum("bt,btd,btv->dv", w, hidden, eps)
        np.testing.assert_allclose(delta["lm_head/kernel"], want, rtol=2e-4, atol=1e-6)


def test_np_selection_exact_modules():
    cfg4 = CFG.replace(num_layers=4)
    a, m, h = perturb.np_scales(cfg4, "mlp", 2, 0.01)
    np.testing.assert_array_equal(a, 0)
    np.testing.assert_allclose(m, [0, 0, 0.01, 0.01])
    assert float(h) == 0
    a, m, h = perturb.np_scales(cfg4, "all", 0, 0.02)
    np.testing.assert_allclose(a, [0.02] * 4)
    np.testing.assert_allclose(m, [0.02] * 4)
    assert float(h) == pytest.approx(0.02)
    assert perturb.np_param_regex(CFG, "head") == (r"^lm_head/kernel$",)
    assert perturb.np_param_regex(CFG.replace(tie_embeddings=True), "attn,head") == (
        r"^layers/attn/o_proj/", r"^embed/embedding$")
    from jaxrl_sparse.errors import UserError
    with pytest.raises(UserError):
        perturb.parse_np_include("ffn")
    with pytest.raises(UserError):
        perturb.np_layer_mask(cfg4, 5)




# ----------------------------------------------------------------------------- end to end
def _preset_config(path, **over):
    from jaxrl_sparse.rl.es import ESConfig
    kw = {}
    fields = {f.name: f for f in dataclasses.fields(ESConfig)}
    for line in open(path):
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, _, val = line[2:].partition("=")
        if not val and name.startswith("no") and name[2:] in fields:
            kw[name[2:]] = False
            continue
        if not val:
            kw[name] = True
            continue
        typ = fields[name].type
        kw[name] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true")}.get(typ, str)(val)
    kw.update(over)
    return ESConfig(**kw)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["es_tiny", "es_qwen_gsm8k_wp", "es_qwen_gsm8k_np", "es_smollm2_arith_wp",
                                  "es_smollm2_arith_np"])
def test_presets_parse(name):
    cfg = _preset_config(os.path.join(ROOT, "configs", f"{name}.flags")).validate()
    assert cfg.resolved_method == ("np" if "np" in name or name == "es_tiny" else "wp")


def test_np_include_alone_implies_np():
    from jaxrl_sparse.rl.es import ESConfig
    c = ESConfig(np_include="mlp").validate()
    assert c.resolved_method == "np" and c.resolved_sigma == 0.005 and c.out_dir == "./out_np_gsm8k"
    assert ESConfig().validate().resolved_sigma == 0.001


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("variant", [{}, dict(optimizer="adam", alpha=0.01),
                                     dict(optimizer="adam", alpha=0.01, method="wp", np_include="", wp_rank=2)],
                         ids=["np-sgd", "np-adam", "lowrank-adam"])
def test_es_tiny_end_to_end_determinism_and_resume(tmp_path, monkeypatch, variant):
    """Interrupted after iteration 1 and resumed == uninterrupted (same CSV, same parameters); with
    --optimizer=adam that needs the moments and step count restored from the checkpoint. The random
    tiny model never answers a problem, so rows are rewarded by a function of their tokens instead
    (all-zero rewards would give zero updates and nothing to compare)."""
    from jaxrl_sparse.rl import es
    loaded = es.tiny_random_model(0)
    monkeypatch.setattr(es, "row_rewards", lambda tok, tokens, mask, golds, n: (
        (np.asarray(tokens) * np.asarray(mask)).sum(1) % 3 == 0).astype(np.float32).reshape(n, -1))
    cfg = _preset_config(os.path.join(ROOT, "configs", "es_tiny.flags"), export_final=False, save_every=5,
                         n_eval=2, max_new_tokens=6, **variant)
    full = es.train(dataclasses.replace(cfg, visualization_dir=str(tmp_path / "a")), progress=False, loaded=loaded)
    again = tmp_path / "b"
    part = es.train(dataclasses.replace(cfg, visualization_dir=str(again)), progress=False, loaded=loaded,
                    stop_after=1)
    assert part["iterations_done"] == 1
    res = es.train(dataclasses.replace(cfg, visualization_dir=str(again)), progress=False, loaded=loaded)
    ra, rb = _read(tmp_path / "a" / "reward_history.csv"), _read(again / "reward_history.csv")
    assert len(ra) == cfg.n_iters * cfg.pop_size and ra == rb
    assert list(ra[0]) == ["iteration", "candidate_index", "seed", "train_reward"]
    for p, q in zip(jax.tree_util.tree_leaves(full["params"]), jax.tree_util.tree_leaves(res["params"])):
        np.testing.assert_array_equal(p, q)
    moved = [not np.array_equal(p, q) for p, q in zip(jax.tree_util.tree_leaves(full["params"]),
                                                       jax.tree_util.tree_leaves(loaded[1]))]
    assert any(moved) and {float(r["train_reward"]) for r in ra} != {0.0}
    assert os.path.exists(tmp_path / "a" / "baseline_completions.txt")
    assert os.path.exists(tmp_path / "a" / "eval_accuracy.png")
    ev = _read(tmp_path / "a" / "eval_history.csv")
    assert [int(r["iteration"]) for r in ev] == [0, 1, 2]


def test_train_rows_deterministic_distinct_and_fresh_per_iteration():
    from jaxrl_sparse.rl.es import train_rows
    a = train_rows(42, 3, 50, 8)
    np.testing.assert_array_equal(a, train_rows(42, 3, 50, 8))            # same (seed, iteration)
    assert a.shape == (8,) and len(set(a.tolist())) == 8 and a.min() >= 0 and a.max() < 50
    assert list(a) == sorted(a)
    draws = [tuple(train_rows(42, it, 50, 8)) for it in range(6)]
    assert len(set(draws)) == 6                                            # fresh problems every iteration
    assert tuple(train_rows(7, 3, 50, 8)) != tuple(a)                      # and per meta_seed
    np.testing.assert_array_equal(train_rows(0, 0, 8, 8), np.arange(8))    # pool == n: every row
    assert len(train_rows(-1, 0, 10, 4)) == 4                              # negative meta_seeds work


def test_train_pool_validation(tmp_path):
    from jaxrl_sparse.errors import UserError
    from jaxrl_sparse.rl import es
    assert es.ESConfig(n_train=8, train_pool=0).validate().train_pool == 0
    assert es.ESConfig(n_train=8, train_pool=8).validate().train_pool == 8
    for bad in (3, -1):
        with pytest.raises(UserError, match="--train_pool"):
            es.ESConfig(n_train=8, train_pool=bad).validate()
    out = tmp_path / "never"   # refused before the output folder (or a model) is made
    with pytest.raises(UserError, match="--train_pool=3 is smaller than --n_train=4"):
        es.train(es.ESConfig(np_include="mlp", n_train=4, train_pool=3, visualization_dir=str(out)), progress=False)
    assert not out.exists()


def test_es_tiny_train_pool_resamples_deterministically_and_resumes(tmp_path, monkeypatch):
    """--train_pool=12 with n_train 4: every iteration trains on the 4 pool problems `train_rows` picks
    (the golds the rewards see, the prompts the population decodes, all padded to the pool's one
    prompt length); two fresh runs and an interrupted + resumed run give the same CSV and parameters."""
    from jaxrl_sparse.rl import es
    from jaxrl_sparse.tasks import math_task
    loaded = es.tiny_random_model(0)
    seen, seen_tokens = [], []   # golds / prompt rows [M, P] per iteration, in call order across the runs
    real_gen = es.np_generate

    def rewards(tok, tokens, mask, golds, n):
        seen.append(list(golds))
        return ((np.asarray(tokens) * np.asarray(mask)).sum(1) % 3 == 0).astype(np.float32).reshape(n, -1)

    def spy_gen(params, mcfg, tokens, *a, **k):
        seen_tokens.append(np.asarray(tokens))
        return real_gen(params, mcfg, tokens, *a, **k)
    monkeypatch.setattr(es, "row_rewards", rewards)
    monkeypatch.setattr(es, "np_generate", spy_gen)
    cfg = _preset_config(os.path.join(ROOT, "configs", "es_tiny.flags"), export_final=False, save_every=5,
                         n_eval=2, max_new_tokens=6, n_iters=3, train_pool=12, skip_eval=True)
    run = lambda d, **k: es.train(dataclasses.replace(cfg, visualization_dir=str(tmp_path / d)), progress=False,
                                  loaded=loaded, **k)
    full = run("a")
    # what iteration `it` must train on: train_rows of the 12-problem pool, encoded together
    pool, _ = math_task.load_math_splits(cfg.data, 12, cfg.n_eval, cfg.meta_seed)
    tok = loaded[2]
    ptok, _ = math_task.encode_left_padded(tok, math_task.build_math_prompts(
        tok, [p["question"] for p in pool], cfg.chat, cfg.system_prompt), cfg.max_prompt_len, tok.pad_token_id)
    gold = math_task.gold_answers(pool)
    want = [es.train_rows(cfg.meta_seed, it, 12, 4) for it in range(3)]
    assert len({tuple(i) for i in want}) == 3 and len({tuple(g) for g in seen}) == 3   # the problems change
    assert seen == [[gold[i] for i in idx] for idx in want]
    for t, idx in zip(seen_tokens, want):
        np.testing.assert_array_equal(t, ptok[idx])
    assert len({t.shape for t in seen_tokens}) == 1
    run("b")
    part = run("c", stop_after=1)
    assert part["iterations_done"] == 1
    res = run("c")
    assert len(seen) == 9 and seen[3:6] == seen[:3] == seen[6:]   # the second run and the resume draw alike
    ra = _read(tmp_path / "a" / "reward_history.csv")
    assert len(ra) == cfg.n_iters * cfg.pop_size and {float(r["train_reward"]) for r in ra} != {0.0}
    assert ra == _read(tmp_path / "b" / "reward_history.csv") == _read(tmp_path / "c" / "reward_history.csv")
    moved = False
    for p, q, p0 in zip(*(jax.tree_util.tree_leaves(x) for x in (full["params"], res["params"], loaded[1]))):
        np.testing.assert_array_equal(p, q)
        moved |= not np.array_equal(p, p0)
    assert moved


# ----------------------------------------------------------------------------- full-rank WP, grouped decode
def test_fullrank_grouped_decode_equals_sequential(params):
    """G members per call (vmapped over their perturbed copies) give the one-by-one tokens, member-major,
    including a last partial group (pop 4, G 3 -> 3 + 1) and antithetic signs."""
    from jaxrl_sparse.rl import es
    cfg = CFG.replace(eos_token_id=1, pad_token_id=0)
    tokens = np.array([[0, 5, 6, 7], [9, 8, 7, 6], [3, 3, 4, 5]], np.int32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    mkeys = es_math.member_keys(jax.random.key(1), np.arange(4, dtype=np.uint32) * 7)
    # two perturbed leaves (a stacked layer kernel and the head) keep the CPU compiles short
    pfn = es.PerturbFn(0.5, perturb.leaf_paths(params, r"layers/mlp/down_proj|lm_head"), jnp.float32)
    gkw = dict(max_new_tokens=6, greedy=True, eos_token_id=1, pad_token_id=0)
    signs = np.array([1.0, -1.0, 1.0, -1.0], np.float32)   # antithetic signs reach both paths
    seq = es.fullrank_generate(params, cfg, tokens, mask, mkeys, jax.random.key(2), gkw, pfn, mesh=False, group=1,
                               signs=signs)
    assert seq[0].shape == (4 * 3, 6) and len({r.tobytes() for r in seq[0]}) > 3   # members differ
    assert not seq[1].all()                                                        # some rows stopped early
    for G in (3,):   # a group of 3 and a last partial group of 1
        got = es.fullrank_generate(params, cfg, tokens, mask, mkeys, jax.random.key(2), gkw, pfn, mesh=False,
                                   group=G, signs=signs)
        np.testing.assert_array_equal(got[0], seq[0])
        np.testing.assert_array_equal(got[1], seq[1])


def test_fullrank_grouped_decode_traces_xla_attention(params, monkeypatch):
    """The vmapped group decode runs under decoder.xla_attention(): with cuDNN forced (which neither a
    CPU nor JAX 0.11.2's vmap of the cuDNN call can run) it still decodes, with XLA's tokens."""
    from jaxrl_sparse.models import decoder
    from jaxrl_sparse.rl import es
    cfg = CFG.replace(eos_token_id=1, pad_token_id=0)
    tokens = np.array([[0, 5, 6, 7], [9, 8, 7, 6]], np.int32)
    mask = np.ones_like(tokens)
    mkeys = es_math.member_keys(jax.random.key(1), np.arange(2, dtype=np.uint32))
    pfn = es.PerturbFn(0.5, perturb.leaf_paths(params, r"lm_head"), jnp.float32)
    gkw = dict(max_new_tokens=3, greedy=True, eos_token_id=1, pad_token_id=0)
    want = es.fullrank_generate(params, cfg, tokens, mask, mkeys, jax.random.key(2), gkw, pfn, mesh=False, group=2)
    jax.clear_caches()                     # retrace: ATTENTION_IMPL is read at trace time
    es._grouped_sampler.cache_clear()
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "cudnn")
    got = es.fullrank_generate(params, cfg, tokens, mask, mkeys, jax.random.key(2), gkw, pfn, mesh=False, group=2)
    np.testing.assert_array_equal(got[0], want[0])


def test_fullrank_group_size_from_memory():
    from jaxrl_sparse.errors import UserError
    from jaxrl_sparse.rl.es import ESConfig, auto_fullrank_group, fullrank_group_size, kv_bytes_per_token
    assert fullrank_group_size(30, None, 10**9, 1, 64, 100, 1000) == 30           # no memory stats (CPU)
    # qwen2.5-1.5b-like: 3.09 GB bf16 weights, 28 layers x 2 x 2 kv heads x 128 x 2 B, 64 rows x 577 slots
    kv = kv_bytes_per_token(ModelConfig("llama", 151936, 1536, 8960, 28, 12, 2, 128, dtype="bfloat16").validate())
    assert kv == 28 * 2 * 2 * 128 * 2
    per = 2 * 3.09e9 + 2 * 64 * 577 * kv + 64 * 151936 * 4
    free = 50e9
    g = int(0.7 * free // per)
    assert g == 4
    assert fullrank_group_size(30, int(free), int(3.09e9), kv, 64, 577, 151936) == 4   # 8 calls: 7 x 4 + 2
    assert fullrank_group_size(30, 2000, 50, 0, 1, 1, 0) == 10    # fits 14 -> 3 calls of 10 (one shape)
    assert fullrank_group_size(30, 10**15, 50, 0, 1, 1, 0) == 30  # clipped to pop
    assert fullrank_group_size(30, 10, 50, 0, 1, 1, 0) == 1       # not even one: one member per call
    assert fullrank_group_size(30, -5, 50, 0, 1, 1, 0) == 1
    assert fullrank_group_size(5, 2000, 50, 0, 1, 1, 0, margin=0.5) == 5
    # on CPU there are no memory statistics: the whole population
    toks = np.ones((3, 4), np.int32)
    assert auto_fullrank_group({"w": jnp.zeros((4, 4))}, CFG, toks, False, {"max_new_tokens": 6}, 7, jnp.float32) == 7
    # --gpu_threads is the group size of full-rank WP (no longer refused); negative values are
    assert ESConfig(gpu_threads=5).validate().gpu_threads == 5
    with pytest.raises(UserError):
        ESConfig(gpu_threads=-1).validate()


def test_antithetic_pairs_decode_opposite_perturbations(params):
    """An antithetic pair shares a seed; the sign -1 member must decode with theta - sigma eps
    (full rank) / W - sigma A B^T / sqrt(r) (low rank), else the pair's z-scores cancel in the update."""
    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.rl import es
    cfg = CFG.replace(eos_token_id=None, pad_token_id=0)
    tokens = np.array([[0, 5, 6, 7], [9, 8, 7, 6]], np.int32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    seeds, signs = es_math.iteration_seeds(jax.random.key(3), 0, 2, antithetic=True)
    assert seeds[0] == seeds[1] and list(signs) == [1.0, -1.0]
    mkeys = es_math.member_keys(jax.random.key(1), seeds)
    gkw = dict(max_new_tokens=4, greedy=True, eos_token_id=None, pad_token_id=0)
    key, sigma = jax.random.key(2), 0.5
    flat = tree_lib.flatten(params)

    def explicit(merged):
        out = generate(tree_lib.unflatten(merged), cfg, tokens, mask, key, mesh=False, **gkw)
        return np.asarray(out.tokens), np.asarray(out.logprobs)

    # full rank, one member per call (the grouped path equals it with signs: the test above)
    paths = perturb.leaf_paths(params, r"layers/mlp/down_proj|lm_head")
    pfn = es.PerturbFn(sigma, paths, jnp.float32)
    eps = perturb.weight_noise(params, mkeys[0], paths)
    got, _ = es.fullrank_generate(params, cfg, tokens, mask, mkeys, key, gkw, pfn, mesh=False, group=1,
                                  signs=signs)
    for n, s in enumerate(signs):
        want, _ = explicit({p: (x + s * sigma * eps[p] if p in eps else x) for p, x in flat.items()})
        np.testing.assert_array_equal(got[2 * n:2 * n + 2], want)
    assert not np.array_equal(got[:2], got[2:])
    # low rank
    r = 2
    lpaths = perturb.lowrank_paths(params, "")
    lr = es.LowRankFn(lpaths, r, jnp.float32)
    out = es.lowrank_generate(params, cfg, tokens, mask, mkeys, sigma, key, gkw, lr, mesh=False, signs=signs)
    fac = perturb.lowrank_factors(params, mkeys[0], lpaths, r)
    for n, s in enumerate(signs):
        want_t, want_lp = explicit({p: (x + s * sigma * perturb.lowrank_delta(*fac[p]) if p in fac else x)
                                    for p, x in flat.items()})
        np.testing.assert_array_equal(np.asarray(out.tokens)[2 * n:2 * n + 2], want_t)
        np.testing.assert_allclose(np.asarray(out.logprobs)[2 * n:2 * n + 2], want_lp, rtol=1e-4, atol=1e-5)
