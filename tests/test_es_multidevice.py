"""Population sharded over 4 fake CPU devices gives the same rollouts, rewards and update as 1 device."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    assert jax.device_count() == 4
    from jaxrl_sparse.models.config import ModelConfig
    from jaxrl_sparse.models.decoder import init_params
    from jaxrl_sparse.rl import es, es_math
    from jaxrl_sparse.transforms import perturb
    cfg = ModelConfig("llama", 64, 16, 32, 2, 2, 1, 8, tie_embeddings=False, eos_token_id=1,
                      pad_token_id=0).validate()
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    tokens = np.array([[0, 5, 6, 7], [9, 8, 7, 6]], np.int32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    N, M = 4, 2
    mkeys = es_math.member_keys(jax.random.key(1), np.arange(N, dtype=np.uint32) * 7)
    scales = perturb.np_scales(cfg, "attn,mlp,head", 0, 0.3)
    gkw = dict(max_new_tokens=6, greedy=True, temperature=1.0, eos_token_id=1, pad_token_id=0)
    cast = es.CastFn(jnp.float32)
    outs = {}
    for name, mesh in (("sharded", None), ("single", False)):
        out, rk, t, m = es.np_generate(params, cfg, tokens, mask, mkeys, scales, jax.random.key(2), gkw, cast,
                                       mesh=mesh)
        outs[name] = (np.asarray(out.tokens), np.asarray(out.mask), rk, t, m)
    a, b = outs["sharded"], outs["single"]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), (a[0], b[0])
    assert len({a[0][i].tobytes() for i in range(N * M)}) > M   # members really differ
    # rewards: golds chosen from the rollouts so some rows score 1
    golds = ["5", "7"]
    ra = es.row_rewards(es.char_tokenizer(), a[0], a[1], golds, N).mean(axis=1)
    rb = es.row_rewards(es.char_tokenizer(), b[0], b[1], golds, N).mean(axis=1)
    assert np.array_equal(ra, rb)
    # replay update: rows sharded over 'data' vs one device
    coef = jnp.repeat(jnp.array([1.0, -0.5, 0.25, 2.0]), M)
    toks = jnp.concatenate([jnp.asarray(a[3]), jnp.asarray(a[0])], 1)
    msk = jnp.concatenate([jnp.asarray(a[4]).astype(bool), jnp.asarray(a[1])], 1)
    contrib = es_math.np_contrib_mask(a[4], a[1])
    fn = es._replay_fn(cfg, "attn,mlp,head", 0, 4, 4, jnp.float32)
    d1 = fn(params, toks, msk, contrib, a[2], coef, scales)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    row = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    put = lambda x, s: jax.device_put(x, s)
    d4 = fn(jax.device_put(params, rep), put(toks, row), put(msk, row), put(contrib, row), put(a[2], row),
            put(coef, row), jax.device_put(scales, rep))
    assert set(d1) == set(d4) and len(d1) == 3
    for k in d1:
        assert float(jnp.abs(d1[k]).max()) > 0
        np.testing.assert_allclose(np.asarray(d4[k]), np.asarray(d1[k]), rtol=1e-4, atol=1e-6)
    # low-rank WP: one batch, sharded vs single
    paths = perturb.lowrank_paths(params, "")
    lr = es.LowRankFn(paths, 2, jnp.float32)
    l4 = es.lowrank_generate(params, cfg, tokens, mask, mkeys, 0.5, jax.random.key(3), gkw, lr, mesh=None)
    l1 = es.lowrank_generate(params, cfg, tokens, mask, mkeys, 0.5, jax.random.key(3), gkw, lr, mesh=False)
    assert np.array_equal(np.asarray(l4.tokens), np.asarray(l1.tokens))
    # full-rank WP, 2 members per call, rows and fsdp-sharded master over data:2 x fsdp:2, vs
    # one member per call on one device: same tokens, rewards and update
    from jaxrl_sparse import parallel
    msh = parallel.make_mesh("data:2,fsdp:2")
    t4, m4 = np.concatenate([tokens, tokens[::-1]]), np.concatenate([mask, mask[::-1]])
    paths = perturb.leaf_paths(params, "lm_head")  # one leaf: short CPU compiles
    pfn = es.PerturbFn(0.5, paths, jnp.float32)
    p_sh = parallel.put_params(params, msh)
    f4 = es.fullrank_generate(p_sh, cfg, t4, m4, mkeys, jax.random.key(4), gkw, pfn, mesh=msh, group=2)
    f1 = es.fullrank_generate(params, cfg, t4, m4, mkeys, jax.random.key(4), gkw, pfn, mesh=False, group=1)
    assert np.array_equal(f4[0], f1[0]) and np.array_equal(f4[1], f1[1]), (f4[0], f1[0])
    assert len({r.tobytes() for r in f1[0]}) > 4
    golds = ["5", "7", "7", "5"]
    r4 = es.row_rewards(es.char_tokenizer(), f4[0], f4[1], golds, N).mean(axis=1)
    r1 = es.row_rewards(es.char_tokenizer(), f1[0], f1[1], golds, N).mean(axis=1)
    assert np.array_equal(r4, r1)
    z = jnp.asarray(es_math.zscore(r1 + 0.01 * np.arange(N)))
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    u4 = es._wp_step_fn(0.1, paths, layout=parallel.param_layout(p_sh, msh))(copy(p_sh), {}, mkeys, z)[0]
    u1 = es._wp_step_fn(0.1, paths)(copy(params), {}, mkeys, z)[0]
    for x, y in zip(jax.tree_util.tree_leaves(u4), jax.tree_util.tree_leaves(u1)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    print("OK")
""")


def test_population_sharded_over_4_devices_matches_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
