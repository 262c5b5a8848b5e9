"""Runs tiny PPO / ES / GRPO jobs and prints their metrics as one JSON line (`RESULT {...}`).

Used by tests/test_parallel.py in subprocesses with 4 fake CPU devices, and as two OS processes
joined by `jax.distributed` (gloo CPU collectives):

    python tests/parallel_worker.py --jobs=ppo,es --mesh=data:2,fsdp:2 --model_dir=DIR --workdir=W \
        [--coordinator_address=localhost:PORT --num_processes=2 --process_id=I]
The same functions run in the pytest process for the one-device reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _clean(rows, drop=("time",)):
    return [{k: v for k, v in r.items() if not any(k.startswith(d) for d in drop)} for r in rows]


def run_ppo(model_dir: str, workdir: str, mesh: str, num_updates: int = 2):
    from jaxrl_sparse.rl import ppo
    cfg = ppo.PPOConfig(model=model_dir, reward_model="vader", reward_text="review_response", n_prompts=32,
                        query_len=10, output_min_length=3, output_max_length=5, batch_size=4,
                        mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, num_updates=num_updates,
                        save_ckpt_every=1, rank_log_every=num_updates, export_final=False, top_k=0, top_p=1.0,
                        track_regex="layers/mlp/down_proj",   # one shape group: a short SVD compile
                        workdir=os.path.join(workdir, "ppo"), mesh=mesh)
    s = ppo.train(cfg, progress=False)
    return _clean(s["metrics"])


def run_es(workdir: str, mesh: str, n_iters: int = 2):
    import jax
    import numpy as np
    from jaxrl_sparse import parallel
    from jaxrl_sparse.rl import es
    from jaxrl_sparse.tasks import math_task
    # a random 2-layer model never answers right: score a function of the exact text instead, so the
    # update is non-zero and depends on every sampled token
    math_task.score_completions = lambda texts, golds: np.asarray(
        [(sum(map(ord, t)) % 7) / 6.0 for t in texts], np.float32)
    cfg = es.ESConfig(method="np", np_include="mlp,head", model_name="tiny-random", mixed_precision="no",
                      data="generated", n_train=4, n_eval=4, n_iters=n_iters, pop_size=4, sigma=0.5,
                      alpha=0.05, greedy=False, max_new_tokens=8, max_prompt_len=48, eval_interval=1,
                      save_every=1, export_final=False, visualization_dir=os.path.join(workdir, "es"),
                      mesh=mesh)
    s = es.train(cfg, progress=False)
    params = parallel.to_host(s["params"])
    csv_text = open(os.path.join(s["out_dir"], "reward_history.csv")).read() if parallel.is_main_process() else ""
    return {"history": _clean(s["history"]), "reward_history_csv": csv_text,
            "param_sums": [float(np.abs(x).astype(np.float64).sum()) for x in jax.tree_util.tree_leaves(params)]}


def run_grpo(model_dir: str, workdir: str, mesh: str, steps: int = 1):
    from jaxrl_sparse.rl import grpo
    g = grpo.GRPOConfig(model=model_dir, data="generated", num_training_data=2 * steps, num_eval=0,
                        prompts_per_step=2, num_samples_per_prompt=2, max_new_tokens=8, num_epochs=1,
                        optim_epochs=2, mini_batch_size=2, lora_rank=4, lora_alpha=8.0, learning_rate=1e-3,
                        kl_coef=0.04, save_every=1, workdir=os.path.join(workdir, "grpo"), mesh=mesh)
    s = grpo.train(g, progress=False)
    return _clean(s["metrics"])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="ppo,es,grpo")
    ap.add_argument("--mesh", default="")
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=1, help="PPO updates / ES iterations / GRPO steps")
    ap.add_argument("--coordinator_address", default="")
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=-1)
    a = ap.parse_args(argv)
    from jaxrl_sparse import parallel
    parallel.init_distributed(a.coordinator_address, a.num_processes, a.process_id)
    import jax
    out = {"devices": jax.device_count(), "processes": jax.process_count(), "process": jax.process_index()}
    for job in a.jobs.split(","):
        if job == "ppo":
            out["ppo"] = run_ppo(a.model_dir, a.workdir, a.mesh, a.steps)
        elif job == "es":
            out["es"] = run_es(a.workdir, a.mesh, a.steps)
        elif job == "grpo":
            out["grpo"] = run_grpo(a.model_dir, a.workdir, a.mesh, a.steps)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
