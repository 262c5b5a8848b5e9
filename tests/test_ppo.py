"""PPO trainer: a step moves log-probs the right way; resume equals an uninterrupted run."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import init_params, split_layers
from jaxrl_sparse.models.value_head import init_value_head
from jaxrl_sparse.rl import ppo

CFG = ModelConfig("llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def _update_inputs(B=2, mb=2, epochs=1, Q=4, N=3, tokens=None, scores=None, kl_coef=0.1, cfg=CFG, **pcfg_kw):
    """(pcfg compile key, params, state, batch) for one update on cfg: B rows of Q + N tokens
    (default: a fixed pattern), scores (default: 1 .. -1 over the rows), KL coefficient kl_coef."""
    pcfg = ppo.PPOConfig(batch_size=B, mini_batch_size=mb, ppo_epochs=epochs, learning_rate=1e-2,
                         output_min_length=N, output_max_length=N, **pcfg_kw)
    params = init_params(cfg, jax.random.key(1))
    trainable = {"model": params, "value_head": init_value_head(cfg.hidden_size, jax.random.key(2))}
    opt = ppo.make_optimizer(pcfg)
    state = {"trainable": jax.tree_util.tree_map(jnp.copy, trainable), "opt_state": opt.init(trainable)}
    if tokens is None:
        tokens = jnp.asarray(np.arange(B * (Q + N)).reshape(B, Q + N) * 7 % 32, jnp.int32)
    mask = jnp.ones_like(tokens)
    resp = jnp.ones((B, N), jnp.float32)
    key = ppo.compile_key(pcfg)
    lp, v, rlp, _ = ppo.make_score_fn(cfg, Q)(trainable, params, tokens, mask, key)
    if scores is None:
        scores = jnp.asarray(np.linspace(1.0, -1.0, B), jnp.float32)
    adv, ret, vals, _ = ppo.compute_advantages(key, scores, lp, rlp, v, resp, jnp.float32(kl_coef))
    batch = {"tokens": tokens, "mask": mask, "resp_mask": resp, "logprobs": lp, "values": vals,
             "advantages": adv, "returns": ret}
    return key, params, state, batch


def test_one_ppo_step_moves_logprobs_towards_reward():
    """Two responses to the same query, rewarded +1 and -1: after one update the first is more
    likely and the second less likely under the policy."""
    Q = 4
    query = np.array([5, 6, 7, 8])
    tokens = jnp.asarray(np.stack([np.r_[query, 1, 2, 3], np.r_[query, 9, 10, 11]]), jnp.int32)
    key, _, state, batch = _update_inputs(Q=Q, tokens=tokens, scores=jnp.array([1.0, -1.0]), kl_coef=0.0,
                                          init_kl_coef=0.0)
    before = np.asarray(batch["logprobs"].sum(1))
    state, stats = ppo.make_update_fn(CFG, key, Q)(state, batch, jax.random.key(3), None)
    after_lp, _, _ = ppo.response_outputs(state["trainable"]["model"], None, CFG, tokens, batch["mask"], Q)
    after = np.asarray(after_lp.sum(1))
    assert after[0] > before[0] + 1e-3, (before, after)
    assert after[1] < before[1] - 1e-3, (before, after)
    assert float(stats["ppo/minibatches_applied"]) == 1.0


def _masked_update_inputs(Q: int):
    """`_update_inputs` for 2 epochs x 2 mini-batches plus a gradient mask freezing part of layer 1's
    q_proj: (key, params, state, batch, mask tree, that q_proj mask)."""
    key, params, state, batch = _update_inputs(B=4, mb=2, epochs=2, Q=Q)
    gm = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, bool), params)
    q = np.ones(params["layers"]["attn"]["q_proj"]["kernel"].shape, bool)
    q[1, :3, :5] = False
    gm["layers"]["attn"]["q_proj"]["kernel"] = jnp.asarray(q)
    return key, params, state, batch, gm, q


@pytest.mark.parametrize("small_below,join", [(0, False), (100, True)])
def test_layer_loop_update_equals_stacked(small_below, join):
    """Carrying per-layer weights and Adam moments through the mini-batch steps (the accelerator
    default) gives the stacked update's state and statistics: 2 epochs x 2 mini-batches, with a
    gradient mask (split per layer too) that freezes part of one layer's q_proj and all of up_proj.
    (100, True), the accelerator default: the norm scales (32 per layer) stay stacked in the carry,
    the matrices are split, q/k/v run as one joined projection and so do the MLP's gate/up (fewer
    dots in the program)."""
    Q = 4
    key, params, state, batch, gm, q = _masked_update_inputs(Q)
    gm["layers"]["mlp"]["up_proj"]["kernel"] = jnp.zeros_like(gm["layers"]["mlp"]["up_proj"]["kernel"])
    if small_below:  # the carry has both parts: stacked norm scales, per-layer matrices
        split = split_layers(params["layers"], small_below)
        assert [a.shape for a in jax.tree_util.tree_leaves(split.small)] == [(2, 32)] * 2
        assert len(jax.tree_util.tree_leaves(split.big)) == 2 * 7
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    fns = [ppo.make_update_fn(CFG, key, Q, masked=True, layer_loop=loop, small_below=small_below if loop else 0,
                              join_qkv=join and loop, join_gate_up=join and loop) for loop in (False, True)]
    if join:  # per layer and step, dots of the forward + input gradient + weight gradient:
        # q/k/v 3 + 3 + 3 -> 1 + 1 + 1, gate/up 2 + 2 + 2 -> 1 + 1 + 1
        def dots(**joins):
            f = ppo.make_update_fn(CFG, key, Q, masked=True, layer_loop=True, small_below=small_below, **joins)
            return f.lower(state, batch, jax.random.key(3), gm).as_text().count("dot_general")
        apart, qkv_only = dots(join_qkv=False, join_gate_up=False), dots(join_qkv=True, join_gate_up=False)
        both = fns[1].lower(state, batch, jax.random.key(3), gm).as_text().count("dot_general")
        assert (apart - qkv_only, qkv_only - both) == (6 * CFG.num_layers, 3 * CFG.num_layers), (apart, qkv_only, both)
    runs = [f(copy(state), batch, jax.random.key(3), gm) for f in fns]
    (s0, st0), (s1, st1) = runs
    assert jax.tree_util.tree_structure(s0) == jax.tree_util.tree_structure(s1)  # stacked again on exit
    for s in (s0, s1):
        new = s["trainable"]["model"]["layers"]
        dq = np.asarray(new["attn"]["q_proj"]["kernel"] - params["layers"]["attn"]["q_proj"]["kernel"])
        assert np.all(dq[~q] == 0) and np.all(np.abs(dq[q]).max() > 0)
        assert np.array_equal(new["mlp"]["up_proj"]["kernel"], params["layers"]["mlp"]["up_proj"]["kernel"])
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s0["trainable"], state["trainable"])
    moved["model"]["layers"]["mlp"]["up_proj"]["kernel"] = 1.0   # frozen above
    assert min(jax.tree_util.tree_leaves(moved)) > 0  # every other weight changed: the comparison means something
    # atol 1e-5 = 1e-3 of one Adam step (lr 1e-2): Adam divides by sqrt(v), so the float noise of two
    # summation orders in a near-zero gradient entry becomes a visible part of that entry's step
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(s1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-5)
    for k in st0:
        np.testing.assert_allclose(float(st1[k]), float(st0[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    assert float(st1["ppo/minibatches_applied"]) == 4.0


def test_score_pass_reads_the_update_carry_as_it_lies():
    """The trainer's score pass reads a resident state's weights in the update's carry layout
    (per-layer matrices, q/k/v and gate/up joined, small leaves stacked), with no stacked copy:
    same old log-probs, values and reference log-probs as from the stacked weights."""
    Q = 4
    key, params, state, batch = _update_inputs(B=3, Q=Q)
    carried = ppo.update_carry(CFG).to_carry(state["trainable"])
    assert "qkv_proj" in carried["model"]["layers"].big[0]["attn"]
    fn = ppo.make_score_fn(CFG, Q)
    want = fn(state["trainable"], params, batch["tokens"], batch["mask"], key)
    got = fn(carried, params, batch["tokens"], batch["mask"], key)
    for a, b in zip(want[:3], got[:3]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(batch["logprobs"]), rtol=1e-5, atol=1e-6)


def test_fused_adam_update_equals_optax():
    """--fused_adam=on (each per-layer matrix's weight gradient + Adam step as one kernel, fed by the
    captured X and dY) gives the layer-loop update's state and statistics with optax: 2 epochs x 2
    mini-batches with a gradient mask. Lowered for CUDA (on this CPU), the update has one Triton
    kernel per matrix and layer and 4 fewer dots per layer (no weight-gradient gemms)."""
    import re
    from jax import export
    Q = 4
    key, params, state, batch, gm, q = _masked_update_inputs(Q)
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    keys = {m: dataclasses.replace(key, fused_adam=m) for m in ("off", "on")}
    # small_below 100: CFG's matrices count as large (split per layer, where the fused step applies)
    fns = {m: ppo.make_update_fn(CFG, k, Q, masked=True, layer_loop=True, small_below=100) for m, k in keys.items()}
    (s0, st0), (s1, st1) = (fns[m](copy(state), batch, jax.random.key(3), gm) for m in ("off", "on"))
    dq = np.asarray(s1["trainable"]["model"]["layers"]["attn"]["q_proj"]["kernel"] - params["layers"]["attn"]["q_proj"]["kernel"])
    assert np.all(dq[~q] == 0) and np.abs(dq[q]).min() > 0
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(s1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-5)
    for k in st0:
        np.testing.assert_allclose(float(st1[k]), float(st0[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    texts = {m: export.export(f, platforms=("cuda",), disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(state, batch, jax.random.key(3), gm).mlir_module()
        for m, f in fns.items()}
    matrices = 4 * CFG.num_layers  # q/k/v joined, o, gate/up joined, down
    assert len(re.findall(r"call @dw_adam", texts["on"])) == matrices
    assert texts["on"].count("__gpu$xla.gpu.triton") == 4  # one kernel per matrix shape, called per layer
    assert texts["off"].count("__gpu$xla.gpu.triton") == 0
    dots = {m: t.count("stablehlo.dot_general") for m, t in texts.items()}
    assert dots["off"] - dots["on"] == matrices, dots


def test_grad_norm_is_logged_on_request():
    """ppo/grad_norm (not a TRL statistic: one more read of every gradient per step) is computed only
    with --log_grad_norm or gradient clipping; it is the global norm of the mini-batch's gradient,
    and the update is the same with or without it."""
    import optax
    Q = 4
    runs, grads = {}, {}
    for flag in (False, True):  # one epoch, one mini-batch: the stat is that step's norm
        key, _, state, batch = _update_inputs(Q=Q, log_grad_norm=flag)
        grads[flag] = jax.grad(lambda t: ppo.make_loss_fn(CFG, key, Q)(t, batch)[0])(state["trainable"])
        runs[flag] = ppo.make_update_fn(CFG, key, Q)(state, batch, jax.random.key(3), None)
    assert "ppo/grad_norm" not in runs[False][1]
    np.testing.assert_allclose(float(runs[True][1]["ppo/grad_norm"]), float(optax.global_norm(grads[True])),
                               rtol=1e-5)
    assert float(runs[True][1]["ppo/grad_norm"]) > 0
    for a, b in zip(jax.tree_util.tree_leaves(runs[False][0]), jax.tree_util.tree_leaves(runs[True][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    key, _, state, batch = _update_inputs(Q=Q, max_grad_norm=1e6)
    assert "ppo/grad_norm" in ppo.make_update_fn(CFG, key, Q)(state, batch, jax.random.key(3), None)[1]


def test_early_stopping_skips_the_remaining_epochs():
    """early_stopping with a KL target every mini-batch exceeds: the first epoch's 2 steps are
    applied, the second epoch's are not, and the state equals a 1-epoch update's. (Per-layer state:
    the select is the same code on the stacked path, which test_layer_loop_update_equals_stacked ties to it.)"""
    Q = 4
    key, _, state, batch = _update_inputs(B=4, mb=2, epochs=2, Q=Q)
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    stop_key = dataclasses.replace(key, early_stopping=True, target_kl=-1e3)  # policykl > -1.5e3 always
    s2, st2 = ppo.make_update_fn(CFG, stop_key, Q, layer_loop=True)(copy(state), batch, jax.random.key(3), None)
    one = dataclasses.replace(key, ppo_epochs=1)
    s1, _ = ppo.make_update_fn(CFG, one, Q, layer_loop=True)(copy(state), batch, jax.random.key(3), None)
    assert float(st2["ppo/minibatches_applied"]) == 2.0
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)  # steps of lr 1e-2 move far more


def test_grad_mask_freezes_unmasked_weights():
    Q = 4
    key, params, state, batch = _update_inputs(Q=Q)
    gm = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, bool), params)
    q = np.zeros(params["layers"]["attn"]["q_proj"]["kernel"].shape, bool)
    q[0, :3, :5] = True
    gm["layers"]["attn"]["q_proj"]["kernel"] = jnp.asarray(q)
    state, _ = ppo.make_update_fn(CFG, key, Q, layer_loop=False)(state, batch, jax.random.key(3), gm)
    new = state["trainable"]["model"]
    dq = np.asarray(new["layers"]["attn"]["q_proj"]["kernel"] - params["layers"]["attn"]["q_proj"]["kernel"])
    assert np.all(dq[~q] == 0) and np.any(dq[q] != 0)
    dk = np.asarray(new["layers"]["mlp"]["up_proj"]["kernel"] - params["layers"]["mlp"]["up_proj"]["kernel"])
    assert np.all(dk == 0)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


_RUN = dict(reward_model="vader", reward_text="review_response", n_prompts=32, query_len=10,
            output_min_length=3, output_max_length=5, batch_size=4, mini_batch_size=2, learning_rate=1e-3,
            save_ckpt_every=1, export_final=False)


def test_resume_equals_uninterrupted(tiny_lm_dir, tmp_path):
    cfg = dict(model=tiny_lm_dir, ppo_epochs=2, num_updates=3, rank_log_every=2, **_RUN)
    full = ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "a"), **cfg), progress=False)
    part = ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "b"), **cfg), progress=False, stop_after=1)
    assert len(part["metrics"]) == 1
    resumed = ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "b"), **cfg), progress=False)
    a, b = _strip(full["metrics"]), _strip(resumed["metrics"])
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    assert "rank/global/density" in a[1]
    from jaxrl_sparse import checkpoint
    assert checkpoint.all_steps(full["ckpt_dir"]) == [0, 1, 2, 3]
    # only the newest step keeps the optimizer state; every step keeps the policy weights, once
    assert [checkpoint.has_resume(full["ckpt_dir"], s) for s in range(4)] == [False, False, False, True]
    assert set(checkpoint.tree_metadata(full["ckpt_dir"], 1)) == {"params"}
    assert [checkpoint.has_resume(resumed["ckpt_dir"], s) for s in range(4)] == [False, False, False, True]
    # the accelerators' update (layer loop on one device) keeps the state in its carry layout between
    # updates: killed and resumed that way, the run matches the stacked one, checkpoints included
    ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "c"), **cfg), progress=False, stop_after=1, layer_loop=True)
    carried = ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "c"), **cfg), progress=False, layer_loop=True)
    c = _strip(carried["metrics"])
    assert [r["step"] for r in c] == [1, 2, 3]
    # policy and reference are equal before the first update: their KL is exactly 0 when both have
    # one layout; the carried policy against the stacked reference differs by summation order only
    assert a[0]["objective/kl"] == 0.0 and abs(c[0]["objective/kl"]) < 1e-3, c[0]["objective/kl"]
    for ra, rc in zip(a, c):  # two summation orders (scanned vs unrolled layers): float noise only
        for k in ra:
            assert ra[k] == pytest.approx(rc[k], rel=1e-4, abs=1e-5), (ra["step"], k)
    ck_a = checkpoint.restore_params(full["ckpt_dir"], 3)
    ck_c = checkpoint.restore_params(carried["ckpt_dir"], 3)
    assert jax.tree_util.tree_structure(ck_a) == jax.tree_util.tree_structure(ck_c)  # stacked, split q/k/v
    for x, y in zip(jax.tree_util.tree_leaves(ck_a), jax.tree_util.tree_leaves(ck_c)):
        # atol 1e-5 = 1% of one Adam step (lr 1e-3). Adam divides by sqrt(v), so in an entry whose
        # gradient is near zero the summation-order noise of the two programs (scanned vs unrolled
        # layers in the update, the score pass and the rollout) is a visible part of its step: a few
        # such entries per million may differ by a fraction of one step, never by more
        x, y = np.asarray(x), np.asarray(y)
        close = np.isclose(y, x, rtol=1e-4, atol=1e-5)
        assert close.mean() > 0.999 and np.max(np.abs(y - x)) < 1e-3, (close.mean(), np.max(np.abs(y - x)))
    # the analyzer reads the trainer's checkpoints end to end (issue 5)
    from jaxrl_sparse.analysis.report import AnalyzeConfig, analyze
    out = tmp_path / "plots"
    summary = analyze(AnalyzeConfig(ckpt_dir=full["ckpt_dir"], out=str(out), progress=False))
    for name in ("coverage_combined.png", "density_combined.png", "layer_ranks.png",
                 "density_heatmap.png", "summary.json", "layer_ranks.csv"):
        assert (out / name).exists(), name
    dens = a[-1]["rank/global/density"]
    js = json.loads((out / "summary.json").read_text())
    # same weights, same tau, same default subset: the analyzer agrees with the trainer's own log
    assert js["views"]["tau=1e-06"]["final_density_pct"] == pytest.approx(dens, rel=1e-6)
    assert summary["steps"] == [0, 1, 2, 3]
    header = (out / "layer_ranks.csv").read_text().splitlines()[0]
    assert header == "layer,module,rows,cols,rank,effective_rank,stable_rank,density"
    assert dens > 0


def test_resume_with_bf16_weights_and_fp32_master(tiny_lm_dir, tmp_path):
    """bf16 storage with an fp32 master copy: checkpoints hold the bf16 policy as `params` and the
    master in the resume item; an interrupted + resumed run ends with the same weights."""
    from jaxrl_sparse import checkpoint
    cfg = dict(model=tiny_lm_dir, ppo_epochs=1, num_updates=2, rank_log_every=2, param_dtype="bfloat16",
               master_weights="fp32", **_RUN)
    full = ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "a"), **cfg), progress=False)
    ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "b"), **cfg), progress=False, stop_after=1)
    resumed = ppo.train(ppo.PPOConfig(workdir=str(tmp_path / "b"), **cfg), progress=False)
    a, b = _strip(full["metrics"]), _strip(resumed["metrics"])
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    ck = full["ckpt_dir"]
    kernel = "layers/attn/q_proj/kernel"
    assert checkpoint.restore_params(ck, 2, paths=[kernel])["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    leaf = checkpoint.restore_params(ck, 2)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=one), leaf)
    got = checkpoint.restore_resume(ck, 2, {"master": master})["master"]
    moved = jax.tree.map(lambda m, p: float(jnp.max(jnp.abs(m - p.astype(jnp.float32)))), got, leaf)
    assert 0 < max(jax.tree_util.tree_leaves(moved)) < 1e-2   # fp32 master: within bf16 rounding of params
    for x, y in zip(jax.tree_util.tree_leaves(leaf), jax.tree_util.tree_leaves(
            checkpoint.restore_params(resumed["ckpt_dir"], 2))):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.slow
def test_ppo_tiny_preset_runs_end_to_end(tmp_path):
    """`python -m launch.ppo --flagfile=configs/ppo_tiny.flags` on the real default model."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tmp_path / "ppo_tiny"
    cache = tmp_path / "xla_cache"
    r = subprocess.run([sys.executable, "-m", "launch.ppo", "--flagfile=configs/ppo_tiny.flags",
                        f"--workdir={work}", "--noprogress", f"--compilation_cache={cache}"], cwd=root,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(cache), "--compilation_cache wrote nothing"   # the launcher flag reaches JAX
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2, 3]
    assert all(np.isfinite(x["env/reward_mean"]) for x in rows)
    assert (work / "ppo-smollm2-135m-instruct-sentiment-final" / "config.json").exists()
    assert (work / "ppo_curves.png").exists()
    from jaxrl_sparse import checkpoint
    ck = str(work / "checkpoints")
    assert checkpoint.all_steps(ck) == [0, 2, 3]
    assert [checkpoint.has_resume(ck, s) for s in (0, 2, 3)] == [False, False, True]   # --keep_opt_state=1
    import shutil
    shutil.rmtree(work)   # ~2.5 GB of real-model checkpoints and export: freed now, not at session end


@pytest.mark.parametrize("kw,msg", [(dict(steps_per_sync=0), "--steps_per_sync=0: give a whole number >= 1"),
                                    (dict(batch_size=6, mini_batch_size=4), "is not a multiple of"),
                                    (dict(fused_adam="maybe"), "fused_adam")])
def test_bad_config_is_a_one_line_error(kw, msg):
    from jaxrl_sparse.errors import UserError
    with pytest.raises(UserError, match=msg) as e:
        ppo.PPOConfig(**kw).validate()
    assert "\n" not in str(e.value)


def test_layer_loop_update_uses_the_attention_kernels():
    """With the layer loop on one device, the update's attention (16-token sequences here) lowers for
    CUDA to one forward and two backward Triton kernels per layer; the CPU lowering and the update's
    result are the XLA path's (the kernels' values: tests/test_train_attention.py)."""
    import re
    from jax import export
    cfg = CFG.replace(head_dim=16)  # the kernels take head sizes >= 16
    key, _, state, batch = _update_inputs(Q=4, N=12, cfg=cfg)
    fn = ppo.make_update_fn(cfg, key, 4, layer_loop=True)
    args = (state, batch, jax.random.key(3), None)
    cuda = export.export(fn, platforms=("cuda",), disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args).mlir_module()
    assert cuda.count("__gpu$xla.gpu.triton") == 3 * cfg.num_layers
    for kernel in ("attention_fwd", "attention_bwd_kv", "attention_bwd_q"):
        assert len(re.findall(f'name = "{kernel}"', cuda)) == cfg.num_layers, kernel
    assert "triton" not in export.export(fn, platforms=("cpu",))(*args).mlir_module()
