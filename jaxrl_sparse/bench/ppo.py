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

from jaxrl_sparse.bench.common import append_jsonl, device_info, markdown_table, peak_memory_bytes, tree_digest
from jaxrl_sparse.bench.gemm import block_name, parse_blocks

SETTINGS = {
    # name: (batch, mini_batch, epochs, query, response, dtype, top_k, top_p, TRL s/iter on H100)
    "fast": (128, 128, 4, 8, 32, "bfloat16", 0, 1.0, 1.72),
    "seed": (16, 4, 4, 16, 64, "float32", 50, 0.95, 5.20),
    "small": (4, 2, 2, 4, 4, "float32", 0, 1.0, None),
    # one short step at fp32 for large shapes (e.g. --model=qwen2.5-7b --mesh=fsdp:4: params, the
    # reference copy, Adam moments and gradients are ~150 GB, more than one H200 holds)
    "big": (8, 8, 1, 16, 16, "float32", 0, 1.0, None),
}


def bench_setting(name: str, model: str = "gpt2-medium", repeats: int = 3, seed: int = 0, mesh: str = "",
                  per_device_batch: int = 0, breakdown: bool = False,
                  layer_loop: Optional[bool] = None, small_below: Optional[int] = None,
                  join_qkv: bool = True, join_gate_up: bool = True, log_grad_norm: bool = False,
                  fused_adam: str = "auto", fused_blocks: str = "", steps_per_sync: int = 1,
                  resident: bool = True, host_profile: str = "", pipeline: bool = False) -> Dict[str, Any]:
    """mesh: 'data:N,fsdp:M' ('' = all devices on data). per_device_batch > 0: the batch is this
    many rows per device (weak scaling), mini-batches keep the setting's batch/mini-batch ratio.
    breakdown: also time the update's parts alone (`update_parts`). layer_loop: the update's
    `ppo.make_update_fn(layer_loop=...)` (None = its default: on for accelerators); small_below: its
    `small_below` (None = the trainer's `ppo.SMALL_LEAF_STACKED_BELOW`); join_qkv, join_gate_up: its
    `join_qkv`, `join_gate_up`; log_grad_norm, fused_adam, steps_per_sync: the trainer's
    --log_grad_norm (off by default, as there), --fused_adam and --steps_per_sync; fused_blocks: the
    fused kernel's tiles ('' = the trainer's, else `gemm.parse_blocks`' format). resident: keep the
    state in the update's carry layout between iterations where the trainer does (layer loop, one
    device; `ppo.update_carry`); False: the update converts it in and out every iteration.
    host_profile: write cProfile statistics of one more iteration there (`python -m pstats FILE`):
    the host's time per call. A jitted call's own time includes enqueueing all of its program's
    kernels, which the device runs meanwhile, so it is not the device's idle time.
    pipeline: queue the next iteration's rollout behind the update before waiting for the update's
    statistics (the host enqueues it while the device updates); off (the trainer's order): each
    iteration dispatches its rollout after the last one's statistics arrived."""
    from jaxrl_sparse import parallel
    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.models import classifier as clf
    from jaxrl_sparse.models.config import preset
    from jaxrl_sparse.models.decoder import init_params
    from jaxrl_sparse.models.value_head import init_value_head
    from jaxrl_sparse.rl import ppo

    B, mb, epochs, Q, N, dtype, top_k, top_p, peer = SETTINGS[name]
    msh = parallel.make_mesh(mesh)
    n_rows = parallel.batch_size_multiple(msh)
    if per_device_batch > 0:
        B, mb, peer = per_device_batch * n_rows, per_device_batch * n_rows * mb // B, None
    parallel.check_batch(B, msh, "the benchmark batch")
    small = name == "small"
    mcfg = preset("gpt2" if small else model, param_dtype=dtype, dtype=dtype)
    if small:
        mcfg = mcfg.replace(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                            num_kv_heads=4, head_dim=16)
    ccfg = clf.distilbert_base_config()
    if small:
        ccfg = clf.distilbert_base_config(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
    k = jax.random.key(seed)
    # random weights created directly sharded (fsdp), never whole on one device
    params = parallel.init_sharded(lambda key: init_params(mcfg, key), msh, k)
    ref = jax.jit(lambda p: p, out_shardings=parallel.param_shardings(params, msh))(params)  # a copy
    cparams = parallel.init_sharded(lambda key: clf.init_params(ccfg, key), msh, jax.random.fold_in(k, 1))
    pcfg = ppo.PPOConfig(batch_size=B, mini_batch_size=mb, ppo_epochs=epochs, query_len=Q,
                         output_min_length=N, output_max_length=N, top_k=top_k, top_p=top_p,
                         param_dtype=dtype, compute_dtype=dtype, log_grad_norm=log_grad_norm,
                         fused_adam=fused_adam, steps_per_sync=steps_per_sync).validate()
    trainable = {"model": params, "value_head": parallel.put_params(init_value_head(mcfg.hidden_size, k), msh)}
    opt = ppo.make_optimizer(pcfg)
    opt_sh = parallel.param_shardings(jax.eval_shape(opt.init, trainable), msh)
    state = {"trainable": trainable, "opt_state": jax.jit(opt.init, out_shardings=opt_sh)(trainable)}
    key = ppo.compile_key(pcfg)
    score_fn = ppo.make_score_fn(mcfg, Q, msh)
    if small_below is None:
        small_below = ppo.SMALL_LEAF_STACKED_BELOW
    resident = resident and ppo.use_resident_update(layer_loop, msh)
    update_fn = ppo.make_update_fn(mcfg, key, Q, msh, parallel.param_layout(state, msh), layer_loop=layer_loop,
                                   small_below=small_below, join_qkv=join_qkv, join_gate_up=join_gate_up,
                                   **({"fused_blocks": parse_blocks(fused_blocks)} if fused_blocks else {}),
                                   resident=resident)
    loop_on = ppo.update_layer_loop(layer_loop)
    one = msh.size == 1  # make_update_fn joins projections on one device only
    carry = ppo.update_carry(mcfg, small_below, join_qkv and one, join_gate_up and one) if loop_on else None
    if resident:  # as the trainer: the state stays in the update's carry layout
        state = carry.to_carry(state)

    @jax.jit
    def reward(tokens):
        ids = tokens % ccfg.vocab_size
        logits = clf.classify(cparams, ccfg, ids, jnp.ones_like(ids))
        return 0.02 * (logits[:, 1] - logits[:, 0])

    rng = np.random.default_rng(seed)
    q_tok = rng.integers(0, mcfg.vocab_size, (B, Q)).astype(np.int32)
    q_mask = np.ones((B, Q), np.int32)

    def start_rollout(i, state):  # dispatched: (its key, the decoding's device arrays)
        kk = jax.random.fold_in(k, 100 + i)
        # as the trainer: the carry layout's weights as they lie when resident
        return kk, generate(state["trainable"]["model"], mcfg, q_tok, q_mask, kk, max_new_tokens=N,
                            top_k=top_k, top_p=top_p, fixed_length=True, eos_token_id=[], mesh=msh,
                            steps_per_sync=pcfg.steps_per_sync)

    def iteration(i, state, queued=None, queue_next=False):
        with jax.profiler.TraceAnnotation(f"ppo iteration {i}"):  # its span in a profile (bench profile)
            return _iteration(i, state, queued, queue_next)

    def _iteration(i, state, queued, queue_next):
        t0 = time.perf_counter()
        kk, gen = queued or start_rollout(i, state)
        jax.block_until_ready(gen.tokens)
        t1 = time.perf_counter()
        tokens = parallel.put_batch(jnp.concatenate([parallel.put_batch(q_tok, msh), gen.tokens], axis=1), msh)
        scores = jax.block_until_ready(reward(tokens))
        t2 = time.perf_counter()
        mask, resp = parallel.put_batch((np.ones(tokens.shape, np.int32), np.ones((B, N), np.float32)), msh)
        lp, v, rlp, klf = score_fn(state["trainable"], ref, tokens, mask, key)
        adv, ret, vals, _ = ppo.compute_advantages(key, scores, lp, rlp, v, resp, jnp.float32(0.2), klf)
        batch = parallel.put_batch({"tokens": tokens, "mask": mask, "resp_mask": resp, "logprobs": lp,
                                    "values": vals, "advantages": adv, "returns": ret}, msh)
        state, stats = update_fn(state, batch, kk, None)
        queued = start_rollout(i + 1, state) if queue_next else None  # runs after the update on the device
        jax.block_until_ready(stats)
        t3 = time.perf_counter()
        return state, (t1 - t0, t2 - t1, t3 - t2), (tokens, mask, batch), queued

    t = time.perf_counter()
    state, _, _, queued = iteration(0, state, queue_next=pipeline)  # compile
    compile_s = time.perf_counter() - t
    times = []
    for i in range(repeats):  # with pipeline, a phase's time is its device time plus the host's waits
        state, ph, last, queued = iteration(i + 1, state, queued, queue_next=pipeline and i + 1 < repeats)
        times.append(ph)
    rollout, rew, upd = (float(np.median([x[j] for x in times])) for j in range(3))
    peak_mem = [peak_memory_bytes(d) or 0 for d in msh.local_devices]
    total = rollout + rew + upd
    row = {"setting": name, "model": mcfg.family if small else model, "batch": B, "mini_batch": mb,
           "epochs": epochs, "query": Q, "response": N, "dtype": dtype,
           "rollout_s": rollout, "reward_s": rew, "update_s": upd, "s_per_iter": total,
           "samples_per_s": B / total, "first_iter_s": compile_s,
           "peer_s_per_iter": peer, "peer_samples_per_s": (B / peer) if peer else None,
           "speedup": (peer / total) if peer else None, "mesh": dict(msh.shape),
           "per_device_batch": B // n_rows, "layer_loop": loop_on, "small_below": small_below,
           "join_qkv": join_qkv, "join_gate_up": join_gate_up, "log_grad_norm": log_grad_norm,
           "fused_adam": ppo.use_fused_adam(key, loop_on, msh.size == 1),
           "fused_blocks": fused_blocks or block_name(ppo.default_fused_blocks(msh)),
           "steps_per_sync": steps_per_sync, "resident": resident, "pipeline": pipeline,
           "peak_mem_gb": max(peak_mem) / 1e9, "peak_mem_gb_per_device": [m / 1e9 for m in peak_mem],
           **device_info()}
    stacked = carry.to_stacked(state) if resident else state
    if host_profile:  # on a copy (the update donates its state): the digest stays the timed iterations'
        if not resident:
            stacked = jax.tree_util.tree_map(jnp.copy, state)
        import cProfile
        prof = cProfile.Profile()
        state = prof.runcall(iteration, repeats + 1, state)[0]
        prof.dump_stats(host_profile)
    del state
    # the weights and Adam moments after the last iteration, bit for bit: runs of the same setting
    # under different XLA_FLAGS compute the same state exactly when these agree
    row["state_digest"] = tree_digest(stacked)
    if breakdown:
        row["update_parts"] = update_parts(stacked, ref, last, mcfg, key, Q, score_fn, repeats, carry)
    return row


def update_parts(state, ref, last, mcfg, pcfg, Q: int, score_fn, repeats: int = 3,
                 carry=None) -> Dict[str, float]:
    """Seconds of the update's parts, each jitted and timed alone (median of `repeats` after a warm-up).

    score: the policy + reference pass over the batch; grad: value and gradient of the PPO loss on
    one mini-batch; optimizer: one optimizer step (donated state); mb_step: one whole mini-batch
    step (`ppo.minibatch_step`, the scanned update's body), all on stacked weights. score + steps x
    mb_step vs the measured update shows what the scan adds (or, with the update's layer loop, saves:
    chained in the scan with per-layer weights a step costs less than alone; BENCHMARKS.md, session 8).
    carry (the layer loop's `ppo.update_carry`): also carry_in / carry_out, the update's conversion
    of the whole state (weights and Adam moments) into its per-layer carry layout and back, paid
    once per update unless the state stays in that layout.
    """
    from jaxrl_sparse.bench.common import time_calls
    from jaxrl_sparse.rl import ppo
    tokens, mask, batch = last
    mbatch = jax.tree_util.tree_map(lambda x: x[:pcfg.mini_batch_size], batch)
    loss_fn = ppo.make_loss_fn(mcfg, pcfg, Q)
    optimizer = ppo.make_optimizer(pcfg)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    opt_step = jax.jit(lambda st, g: ppo.apply_grads(optimizer, st, g), donate_argnums=(0,))
    mb_step = jax.jit(lambda st: ppo.minibatch_step(loss_fn, optimizer, st, mbatch)[0], donate_argnums=(0,))
    out = {"score": time_calls(lambda: score_fn(state["trainable"], ref, tokens, mask, pcfg), repeats)["median_s"]}
    t = time_calls(lambda: grad(state["trainable"], mbatch), repeats)
    out["grad"], g = t["median_s"], t["out"][1]
    box = [state]

    def run(f, *a):  # steps the donated state
        box[0] = f(box[0], *a)
        return box[0]

    out["optimizer"] = time_calls(lambda: run(opt_step, g), repeats)["median_s"]
    out["mb_step"] = time_calls(lambda: run(mb_step), repeats)["median_s"]
    if carry is not None:
        t = time_calls(lambda: carry.to_carry(box[0]), repeats)
        out["carry_in"] = t["median_s"]
        out["carry_out"] = time_calls(lambda: carry.to_stacked(t["out"]), repeats)["median_s"]
    return out



def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    from absl import flags as _f  # own FlagValues: the bench dispatcher parses argv per command
    fv = _f.FlagValues()
    _f.DEFINE_list("settings", ["fast", "seed"], "which settings: fast, seed, small", flag_values=fv)
    _f.DEFINE_string("model", "gpt2-medium", "policy shape (random weights)", flag_values=fv)
    _f.DEFINE_integer("repeats", 3, "timed iterations after the compile one", flag_values=fv)
    _f.DEFINE_string("out", "", "append JSON lines here", flag_values=fv)
    _f.DEFINE_string("mesh", "", "device mesh 'data:N,fsdp:M' ('' = all visible devices on data)", flag_values=fv)
    _f.DEFINE_integer("per_device_batch", 0, "rows per device (weak scaling); 0 = the setting's global batch",
                      flag_values=fv)
    _f.DEFINE_bool("breakdown", False, "also time the update's parts alone: score pass, one mini-batch "
                   "gradient, one optimizer step, one mini-batch step; with the layer loop also the state's "
                   "conversion into its per-layer carry and back", flag_values=fv)
    _f.DEFINE_enum("layer_loop", "auto", ["auto", "on", "off"], "the update carries per-layer weights "
                   "through its mini-batch steps (auto: on for accelerators, off on CPU)", flag_values=fv)
    _f.DEFINE_integer("small_below", None, "with the layer loop, leaves with fewer elements per layer stay "
                      "stacked (default: the trainer's; 0: every leaf split per layer)", flag_values=fv)
    _f.DEFINE_bool("join_qkv", True, "with the layer loop, each layer's q/k/v projections run as one gemm",
                   flag_values=fv)
    _f.DEFINE_bool("join_gate_up", True, "with the layer loop, a gated MLP's gate/up projections run as one "
                   "gemm (no-op for gpt2, which has no gate)", flag_values=fv)
    _f.DEFINE_bool("log_grad_norm", False, "the update also computes the gradients' global norm per "
                   "mini-batch step (the trainer's --log_grad_norm)", flag_values=fv)
    _f.DEFINE_enum("fused_adam", "auto", ["auto", "on", "off"], "the trainer's --fused_adam: each weight "
                   "matrix's gradient and Adam step as one kernel (auto: on GPUs where it applies)", flag_values=fv)
    _f.DEFINE_string("fused_blocks", "", "tiles of the fused kernel, BKxBNxBMwWARPSsSTAGES[t][p][gPROGRAMS] "
                     "('' = the trainer's, `ppo.default_fused_blocks`)",
                     flag_values=fv)
    _f.DEFINE_bool("resident", True, "keep the state in the update's carry layout between iterations, as the "
                   "trainer does with the layer loop on one device (--noresident: converted every update)",
                   flag_values=fv)
    _f.DEFINE_string("host_profile", "", "write cProfile statistics of one more iteration to this file "
                     "(host time per call; with several settings, the last one's)", flag_values=fv)
    _f.DEFINE_bool("pipeline", False, "queue the next rollout behind the update before waiting for its "
                   "statistics (default off, the trainer's order: each rollout dispatched after the last "
                   "update finished)", flag_values=fv)
    from jaxrl_sparse.rl.ppo import PPOConfig
    _f.DEFINE_integer("steps_per_sync", PPOConfig.steps_per_sync, "the trainer's --steps_per_sync: rollout "
                      "decode steps per loop test", flag_values=fv)
    fv(["bench ppo"] + list(argv or []))
    if fv.fused_blocks:
        parse_blocks(fv.fused_blocks)
    loop = {"auto": None, "on": True, "off": False}[fv.layer_loop]
    rows = []
    for s in fv.settings:
        if s not in SETTINGS:
            from jaxrl_sparse.errors import UserError
            raise UserError(f"--settings: unknown {s!r}; choose {', '.join(SETTINGS)}")
        row = bench_setting(s, fv.model, fv.repeats, mesh=fv.mesh, per_device_batch=fv.per_device_batch,
                            breakdown=fv.breakdown, layer_loop=loop,
                            small_below=fv.small_below, join_qkv=fv.join_qkv, join_gate_up=fv.join_gate_up,
                            log_grad_norm=fv.log_grad_norm, fused_adam=fv.fused_adam,
                            fused_blocks=fv.fused_blocks, steps_per_sync=fv.steps_per_sync,
                            resident=fv.resident, host_profile=fv.host_profile, pipeline=fv.pipeline)
        rows.append(row)
        append_jsonl(fv.out or None, {"bench": "ppo", **row})
    print(markdown_table(rows, [("setting", "setting"), ("batch", "B"), ("mini_batch", "mb"),
                                ("query", "Q"), ("response", "N"), ("dtype", "dtype"),
                                ("rollout_s", "rollout s"), ("reward_s", "reward s"),
                                ("update_s", "update s"), ("s_per_iter", "s/iter"),
                                ("samples_per_s", "samples/s"), ("peer_s_per_iter", "TRL s/iter"),
                                ("speedup", "× TRL"), ("first_iter_s", "1st iter (compile) s"),
                                ("peak_mem_gb", "peak GB/device"), ("n_devices", "devices"),
                                ("device", "device")]))
    for row in rows:
        if "update_parts" in row:
            n = row["epochs"] * row["batch"] // row["mini_batch"]
            parts = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in row["update_parts"].items())
            print(f"{row['setting']}: update {1e3 * row['update_s']:.1f} ms = score + {n} mini-batch steps; "
                  f"alone: {parts}")
    return rows
