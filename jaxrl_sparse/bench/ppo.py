"""`python -m launch.bench ppo`: one PPO iteration per phase, gpt2-medium + DistilBERT reward.

Random weights at the real shapes (no downloads). The reward model reads the generated token ids
mapped into its vocabulary (detokenize/retokenize is host string work, excluded and small).
Peer: TRL 0.8.6 PPOTrainer on the same H100 (`../shared/GPU_NOTES.md`), quoted, not re-run:
TRL is not installed there.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.bench.common import append_jsonl, device_info, markdown_table, peak_memory_bytes

SETTINGS = {
    # name: (batch, mini_batch, epochs, query, response, dtype, top_k, top_p, TRL s/iter on H100)
    "fast": (128, 128, 4, 8, 32, "bfloat16", 0, 1.0, 1.72),
    "seed": (16, 4, 4, 16, 64, "float32", 50, 0.95, 5.20),
    "small": (4, 2, 2, 4, 4, "float32", 0, 1.0, None),
}


def bench_setting(name: str, model: str = "gpt2-medium", repeats: int = 3, seed: int = 0) -> Dict[str, Any]:
    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.models import classifier as clf
    from jaxrl_sparse.models.config import preset
    from jaxrl_sparse.models.decoder import init_params
    from jaxrl_sparse.models.value_head import init_value_head
    from jaxrl_sparse.rl import ppo

    B, mb, epochs, Q, N, dtype, top_k, top_p, peer = SETTINGS[name]
    small = name == "small"
    mcfg = preset("gpt2" if small else model, param_dtype=dtype, dtype=dtype)
    if small:
        mcfg = mcfg.replace(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                            num_kv_heads=4, head_dim=16)
    ccfg = clf.distilbert_base_config()
    if small:
        ccfg = clf.distilbert_base_config(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
    k = jax.random.key(seed)
    params = jax.jit(lambda key: init_params(mcfg, key))(k)
    ref = jax.tree_util.tree_map(jnp.copy, params)
    cparams = jax.jit(lambda key: clf.init_params(ccfg, key))(jax.random.fold_in(k, 1))
    pcfg = ppo.PPOConfig(batch_size=B, mini_batch_size=mb, ppo_epochs=epochs, query_len=Q,
                         output_min_length=N, output_max_length=N, top_k=top_k, top_p=top_p,
                         param_dtype=dtype, compute_dtype=dtype)
    trainable = {"model": params, "value_head": init_value_head(mcfg.hidden_size, k)}
    opt = ppo.make_optimizer(pcfg)
    state = {"trainable": trainable, "opt_state": opt.init(trainable)}
    key = ppo.compile_key(pcfg)
    score_fn = ppo.make_score_fn(mcfg, Q)
    update_fn = ppo.make_update_fn(mcfg, key, Q)

    @jax.jit
    def reward(tokens):
        ids = tokens % ccfg.vocab_size
        logits = clf.classify(cparams, ccfg, ids, jnp.ones_like(ids))
        return 0.02 * (logits[:, 1] - logits[:, 0])

    rng = np.random.default_rng(seed)
    q_tok = jnp.asarray(rng.integers(0, mcfg.vocab_size, (B, Q)), jnp.int32)
    q_mask = jnp.ones((B, Q), jnp.int32)

    def iteration(i, state):
        kk = jax.random.fold_in(k, 100 + i)
        t0 = time.perf_counter()
        gen = generate(state["trainable"]["model"], mcfg, q_tok, q_mask, kk, max_new_tokens=N,
                       top_k=top_k, top_p=top_p, fixed_length=True, eos_token_id=[])
        jax.block_until_ready(gen.tokens)
        t1 = time.perf_counter()
        tokens = jnp.concatenate([q_tok, gen.tokens], axis=1)
        scores = jax.block_until_ready(reward(tokens))
        t2 = time.perf_counter()
        mask = jnp.ones_like(tokens)
        resp = jnp.ones((B, N), jnp.float32)
        lp, v, rlp, klf = score_fn(state["trainable"], ref, tokens, mask, key)
        adv, ret, vals, _ = ppo.compute_advantages(key, scores, lp, rlp, v, resp, jnp.float32(0.2), klf)
        batch = {"tokens": tokens, "mask": mask, "resp_mask": resp, "logprobs": lp, "values": vals,
                 "advantages": adv, "returns": ret}
        state, stats = update_fn(state, batch, kk, None)
        jax.block_until_ready(stats)
        t3 = time.perf_counter()
        return state, (t1 - t0, t2 - t1, t3 - t2)

    t = time.perf_counter()
    state, _ = iteration(0, state)  # compile
    compile_s = time.perf_counter() - t
    times = []
    for i in range(repeats):
        state, ph = iteration(i + 1, state)
        times.append(ph)
    rollout, rew, upd = (float(np.median([x[j] for x in times])) for j in range(3))
    total = rollout + rew + upd
    row = {"setting": name, "model": mcfg.family if small else model, "batch": B, "mini_batch": mb,
           "epochs": epochs, "query": Q, "response": N, "dtype": dtype,
           "rollout_s": rollout, "reward_s": rew, "update_s": upd, "s_per_iter": total,
           "samples_per_s": B / total, "first_iter_s": compile_s,
           "peer_s_per_iter": peer, "peer_samples_per_s": (B / peer) if peer else None,
           "speedup": (peer / total) if peer else None, "peak_mem_gb": (peak_memory_bytes() or 0) / 1e9,
           **device_info()}
    return row



def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    from absl import flags as _f  # own FlagValues: the bench dispatcher parses argv per command
    fv = _f.FlagValues()
    _f.DEFINE_list("settings", ["fast", "seed"], "which settings: fast, seed, small", flag_values=fv)
    _f.DEFINE_string("model", "gpt2-medium", "policy shape (random weights)", flag_values=fv)
    _f.DEFINE_integer("repeats", 3, "timed iterations after the compile one", flag_values=fv)
    _f.DEFINE_string("out", "", "append JSON lines here", flag_values=fv)
    fv(["bench ppo"] + list(argv or []))
    rows = []
    for s in fv.settings:
        row = bench_setting(s, fv.model, fv.repeats)
        rows.append(row)
        append_jsonl(fv.out or None, {"bench": "ppo", **row})
    print(markdown_table(rows, [("setting", "setting"), ("batch", "B"), ("mini_batch", "mb"),
                                ("query", "Q"), ("response", "N"), ("dtype", "dtype"),
                                ("rollout_s", "rollout s"), ("reward_s", "reward s"),
                                ("update_s", "update s"), ("s_per_iter", "s/iter"),
                                ("samples_per_s", "samples/s"), ("peer_s_per_iter", "TRL s/iter"),
                                ("speedup", "× TRL"), ("first_iter_s", "1st iter (compile) s"),
                                ("device", "device")]))
    return rows
