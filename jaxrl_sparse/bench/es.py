"""`python -m launch.bench es`: one ES iteration per method (NP, low-rank WP, full-rank WP), by phase.

qwen2.5-1.5b shapes, random weights (speed does not depend on weight values), pop 30, n_train 64,
256 new tokens at fixed length, greedy (the trainer's default), bf16 compute with fp32 master weights. Phases: generate (all
members' rollouts), reward (token ids -> host strings -> exact-match, a proxy for detokenisation),
update (NP replay / WP update). The first iteration (compilation) is excluded.
Peer (quoted from the seed's measurements on the same H100, not re-run): 30 sequential HF `generate`
calls at batch 64 per iteration, 5.47 s each = 164 s/iteration before perturbation costs.
`--small`: a 2-layer model and tiny population, runs in seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

SEED_S_PER_ITER = 164.0   # 30 x 5.47 s (HF generate, batch 64, 256 new tokens, H100)


def _rewards_proxy(tokens, mask, n_members: int) -> np.ndarray:
    from jaxrl_sparse.tasks.math_task import score_completions
    t, m = np.asarray(tokens), np.asarray(mask).astype(bool)
    texts = ["".join(chr(48 + int(x) % 75) for x in row[mm]) for row, mm in zip(t, m)]
    return score_completions(texts, ["42"] * len(texts)).reshape(n_members, -1).mean(1)


def run(small: bool = False, methods=("np", "lowrank", "full"), pop: int = 30, n_train: int = 64,
        new_tokens: int = 256, prompt_len: int = 128, rank: int = 1, np_include: str = "mlp",
        last_k: int = 1, micro_members: int = 1, tok_chunk: int = 128, seed: int = 0, mesh: str = "",
        per_device_pop: int = 0, np_capture: bool = True, wp_group: int = 0,
        np_noise_prompt: bool = True) -> Dict[str, Any]:
    """mesh: 'data:N,fsdp:M' ('' = all devices on data): population rows split over the devices,
    the fp32 master over fsdp. per_device_pop > 0: pop = per_device_pop x devices (weak scaling).
    np_capture: NP generation keeps the stream entering block L - last_k and the replay runs only the
    last_k blocks from it (`es.np_capture_layer`); False = replay every block.
    np_noise_prompt: False = NP noise on the decode steps only (`launch.es --nonp_noise_prompt`).
    wp_group: full-rank WP members decoded per call (0 = from free device memory, all on CPU); the
    size used is reported as results['wp_group']."""
    from jaxrl_sparse import parallel
    from jaxrl_sparse.models.config import preset
    from jaxrl_sparse.models.decoder import init_params
    from jaxrl_sparse.rl import es, es_math
    from jaxrl_sparse.transforms import perturb

    cfg = preset("qwen2.5-1.5b", param_dtype="float32", dtype="bfloat16")
    if small:
        cfg = cfg.replace(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                          head_dim=16, vocab_size=512, dtype="float32")
        pop, n_train, new_tokens, prompt_len, micro_members, tok_chunk = 4, 2, 8, 16, 2, 16
    cdt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    key = jax.random.key(seed)
    msh = parallel.make_mesh(mesh)
    if per_device_pop > 0:
        pop = per_device_pop * parallel.batch_size_multiple(msh)
    parallel.check_batch(pop * n_train, msh, "pop x n_train")
    params = parallel.init_sharded(lambda k: init_params(cfg, k), msh, key)
    layout = parallel.param_layout(params, msh)
    tokens = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (n_train, prompt_len), 10, cfg.vocab_size))
    mask = np.ones_like(tokens)
    # greedy, as `launch.es` decodes by default (the perturbation is the exploration)
    gkw = dict(max_new_tokens=new_tokens, greedy=True, eos_token_id=None, pad_token_id=0, fixed_length=True)
    cast = es.CastFn(cdt)
    sigma, alpha = 0.001, 0.001
    results: Dict[str, Any] = {"device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
                               "mesh": dict(msh.shape),
                               "model": "qwen2.5-1.5b" + (" (small)" if small else ""), "pop": pop,
                               "np_noise_prompt": np_noise_prompt,
                               "n_train": n_train, "new_tokens": new_tokens, "prompt_len": prompt_len,
                               "methods": {}}

    def iteration(method: str, it: int, state):
        seeds, signs = es_math.iteration_seeds(key, it, pop)
        mkeys = es_math.member_keys(jax.random.fold_in(key, 7), seeds)
        kg = jax.random.fold_in(key, 100 + it)
        t0 = time.perf_counter()
        if method == "np":
            scales = perturb.np_scales(cfg, np_include, last_k, 0.005)
            out, rk, pt, pm = es.np_generate(state, cfg, tokens, mask, mkeys, scales, kg, gkw, cast, mesh=msh,
                                             capture_layer=es.np_capture_layer(cfg, np_include, last_k, np_capture),
                                             noise_in_prompt=np_noise_prompt)
            gt, gm = jax.block_until_ready((out.tokens, out.mask))
        elif method == "lowrank":
            lr = es.LowRankFn(perturb.lowrank_paths(state, ""), rank, cdt)
            out = es.lowrank_generate(state, cfg, tokens, mask, mkeys, sigma, kg, gkw, lr, mesh=msh)
            gt, gm = jax.block_until_ready((out.tokens, out.mask))
        else:
            pfn = es.PerturbFn(sigma, perturb.leaf_paths(state, ""), cdt)
            fmesh = msh if n_train % parallel.batch_size_multiple(msh) == 0 else False
            if "wp_group" not in results:   # decided once (the first, compiling iteration)
                results["wp_group"] = wp_group or es.auto_fullrank_group(state, cfg, tokens, fmesh, gkw, pop, cdt)
            g = results["wp_group"]
            gt, gm = es.fullrank_generate(state, cfg, tokens, mask, mkeys, kg, gkw, pfn, mesh=fmesh, group=g)
        t1 = time.perf_counter()
        r = _rewards_proxy(gt, gm, pop)
        z = np.asarray(es_math.zscore(r + 1e-3 * np.arange(pop))) * signs   # never all-zero
        t2 = time.perf_counter()
        if method == "np":
            fn = es._replay_fn(cfg, np_include, last_k, tok_chunk, es.np_micro_members(pop, micro_members) * n_train,
                               cdt)
            gt, gm = parallel.to_host((gt, gm))
            row_coef = np.repeat(np.asarray(z / (pop * 0.005), np.float32), n_train)
            toks, msk, contrib, start = es.np_replay_rows(pt, pm, gt, gm, np_noise_prompt)
            rows = parallel.put_batch((toks, msk, contrib, np.asarray(rk), row_coef, out.hidden, start), msh)
            delta = fn(state, *rows[:5], scales, *rows[5:])
            del out, rows
            state = es._opt_step_fn(alpha, layout=layout)(state, delta, {})[0]
        elif method == "lowrank":
            state = es._wp_step_fn(alpha, lr.paths, rank, layout=layout)(state, {}, mkeys, jnp.asarray(z))[0]
        else:
            state = es._wp_step_fn(alpha, pfn.paths, layout=layout)(state, {}, mkeys, jnp.asarray(z))[0]
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        return state, {"generate_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "total_s": t3 - t0}

    for m in methods:
        state = jax.jit(lambda p: p, out_shardings=layout.tree)(params)  # a copy (donated by updates)
        t = time.perf_counter()
        state, _ = iteration(m, 0, state)
        first = time.perf_counter() - t
        state, ph = iteration(m, 1, state)
        ph["first_iteration_s"] = first
        ph["speedup_vs_seed"] = SEED_S_PER_ITER / ph["total_s"]
        stats = jax.local_devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:  # process peak so far (this and earlier methods)
            ph["peak_gb"], ph["limit_gb"] = stats["peak_bytes_in_use"] / 2**30, stats.get("bytes_limit", 0) / 2**30
        results["methods"][m] = ph
        del state
    return results


def main(argv: Optional[List[str]] = None):
    ap = argparse.ArgumentParser(prog="python -m launch.bench es", description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny model on CPU (seconds)")
    ap.add_argument("--methods", default="np,lowrank,full", help="comma list of np, lowrank, full")
    ap.add_argument("--pop", type=int, default=30)
    ap.add_argument("--n_train", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=1, help="low-rank WP rank")
    ap.add_argument("--np_include", default="mlp")
    ap.add_argument("--last_k", type=int, default=1)
    ap.add_argument("--micro_members", type=int, default=1, help="NP replay: members per micro-batch")
    ap.add_argument("--tok_chunk", type=int, default=128, help="NP replay: tokens per chunk")
    ap.add_argument("--np_no_capture", action="store_true",
                    help="NP: replay every block (no hidden state captured during generation)")
    ap.add_argument("--np_decode_noise_only", action="store_true",
                    help="NP: noise on the decode steps only (launch.es --nonp_noise_prompt; the prompt's prefill is shared)")
    ap.add_argument("--wp_group", type=int, default=0,
                    help="full-rank WP: members decoded per call, vmapped (0 = as many as fit in device memory)")
    ap.add_argument("--mesh", default="", help="device mesh data:N,fsdp:M ('' = all visible devices on data)")
    ap.add_argument("--per_device_pop", type=int, default=0,
                    help="weak scaling: pop = this x devices (0 = --pop, strong scaling)")
    ap.add_argument("--out", default="", help="append the result as one JSON line to this file")
    a = ap.parse_args(argv)
    res = run(a.small, tuple(m for m in a.methods.split(",") if m), a.pop, a.n_train, a.new_tokens,
              a.prompt_len, a.rank, a.np_include, a.last_k, a.micro_members, a.tok_chunk, mesh=a.mesh,
              per_device_pop=a.per_device_pop, np_capture=not a.np_no_capture, wp_group=a.wp_group,
              np_noise_prompt=not a.np_decode_noise_only)
    print(f"ES iteration on {res['device']} x{res['n_devices']} (mesh {res['mesh']}): {res['model']}, pop {res['pop']}, "
          f"n_train {res['n_train']}, {res['new_tokens']} new tokens (fixed), prompt {res['prompt_len']}")
    print("| method | generate s | reward s | update s | s / iteration | vs seed 164 s |")
    print("|---|---|---|---|---|---|")
    for m, ph in res["methods"].items():
        print(f"| {m} | {ph['generate_s']:.2f} | {ph['reward_s']:.2f} | {ph['update_s']:.2f} | "
              f"{ph['total_s']:.2f} | {ph['speedup_vs_seed']:.1f}x |")
    if "wp_group" in res:
        print(f"full-rank WP: {res['wp_group']} members per decode call (--wp_group; 0 = from free memory)")
    for m, ph in res["methods"].items():
        if "peak_gb" in ph:
            print(f"{m}: device memory peak so far {ph['peak_gb']:.1f} GiB of {ph['limit_gb']:.1f} GiB")
    print("seed figure (quoted): 30 sequential HF generate calls at batch 64, 5.47 s each = 164 s/iteration (H100)")
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
