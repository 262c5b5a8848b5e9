"""`python -m launch.bench grpo`: GRPO + LoRA rollout and update speed on gemma-2-2b shapes.

Random weights at the real shapes (no downloads), bf16. 16 prompts x K=8 samples, 64 prompt
tokens, 256 new tokens (`fixed_length`, so every row decodes all of them):
  rollout  one batched `generate` call with the adapters merged inside the jit -> tokens/s, beside
           transformers `generate` on the same shapes when torch with CUDA is importable;
  score    old + reference log-probs (two teacher-forced passes) -> seconds;
  update   one optimisation epoch over the 128 completions in mini-batches of 16 -> seconds and
           model-FLOPs utilisation  MFU = 6 * N_params * tokens / time / peak   (peak: 989 TFLOP/s,
           H100/H200 dense bf16; `--peak_tflops` to override). With a frozen base the backward
           skips weight gradients, so the work done is nearer 4N per token: `mfu_4n` reports that.
`--small` runs a 2-layer model with a few tokens on the CPU in seconds (a smoke test).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.bench.common import (append_jsonl, device_info, markdown_table, peak_memory_bytes,
                                       time_calls)


def run(small: bool = False, prompts: int = 16, k: int = 8, prompt_len: int = 64, new_tokens: int = 256,
        mini_batch: int = 16, rank: int = 8, targets: str = "q_proj,v_proj", repeats: int = 3,
        hf: bool = True, peak_tflops: float = 989.0, seed: int = 0, remat: bool = True) -> Dict[str, Any]:
    from jaxrl_sparse import tree as tree_lib
    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.models.config import preset
    from jaxrl_sparse.models.decoder import init_params
    from jaxrl_sparse.rl import grpo
    from jaxrl_sparse.transforms import lora

    dtype = "float32" if small else "bfloat16"
    cfg = preset("gemma-2-2b", param_dtype=dtype, dtype=dtype)
    if small:
        cfg = cfg.replace(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                          num_kv_heads=2, head_dim=16, vocab_size=512, layer_types=())
        prompts, k, prompt_len, new_tokens, mini_batch, repeats = 2, 2, 8, 8, 2, 1
    key = jax.random.key(seed)
    params = jax.jit(lambda kk: init_params(cfg, kk))(key)
    ad = lora.init_lora(params, targets, rank, jax.random.fold_in(key, 1))
    ad = jax.tree_util.tree_map(lambda x: x + 1e-3, ad)   # a non-zero delta, like a trained adapter
    B = prompts * k
    g = grpo.GRPOConfig(prompts_per_step=prompts, num_samples_per_prompt=k, max_new_tokens=new_tokens,
                        mini_batch_size=mini_batch, lora_targets=targets, lora_rank=rank,
                        lora_alpha=2.0 * rank, kl_coef=0.04, remat=remat and not small,
                        param_dtype=dtype, compute_dtype=dtype).validate()
    rs = np.random.RandomState(seed)
    p_tok = np.repeat(rs.randint(3, cfg.vocab_size, (prompts, prompt_len)).astype(np.int32), k, axis=0)
    p_mask = np.ones_like(p_tok)
    merge = lora.merge_fn(float(g.lora_alpha), rank)
    gen_params = {"base": params, "lora": ad}

    def rollout():
        return generate(gen_params, cfg, p_tok, p_mask, jax.random.fold_in(key, 2),
                        max_new_tokens=new_tokens, temperature=1.0, fixed_length=True,
                        eos_token_id=[], params_fn=merge, mesh=False)
    r = time_calls(rollout, repeats=repeats)
    gen = r["out"]
    row: Dict[str, Any] = {"setting": "small" if small else "gemma-2-2b", "batch": f"{prompts}x{k}",
                           "new_tokens": new_tokens, "rollout_s": r["median_s"],
                           "rollout_compile_s": r["first_s"] - r["median_s"],
                           "rollout_tokens_per_s": B * new_tokens / r["median_s"]}

    score, upd = grpo._step_fns(cfg, grpo._jit_key(g))
    tokens = jnp.asarray(np.concatenate([p_tok, np.asarray(gen.tokens)], 1))
    mask = jnp.ones_like(tokens)
    resp = jnp.ones((B, new_tokens), jnp.float32)
    s = time_calls(lambda: score(ad, params, tokens, mask, resp, None), repeats=repeats)
    old, ref = s["out"]
    adv = jnp.asarray(rs.randn(B).astype(np.float32))
    batch = {"tokens": tokens, "mask": mask, "resp_mask": resp, "old_lp": old, "ref_lp": ref, "adv": adv}
    opt = grpo.make_optimizer(g)
    state = {"lora": ad, "opt_state": opt.init(ad)}
    holder = {"state": state}

    def update():
        holder["state"], stats = upd(holder["state"], params, batch, jax.random.fold_in(key, 3), None)
        return stats
    u = time_calls(update, repeats=repeats)
    n_params = tree_lib.count(params)
    n_tok = B * tokens.shape[1]
    flops6 = 6.0 * n_params * n_tok
    peak = peak_tflops * 1e12
    on_gpu = jax.devices()[0].platform == "gpu"
    row.update(score_s=s["median_s"], update_s=u["median_s"], update_compile_s=u["first_s"] - u["median_s"],
               update_tokens=n_tok, n_params=n_params, lora_params=lora.num_params(ad),
               update_tflops=flops6 / u["median_s"] / 1e12,
               mfu=flops6 / u["median_s"] / peak if on_gpu else None,
               mfu_4n=4.0 * n_params * n_tok / u["median_s"] / peak if on_gpu else None,
               peak_mem_gb=(peak_memory_bytes() or 0) / 2 ** 30 or None)
    if hf and not small:
        from jaxrl_sparse.bench.generate import _hf_available, bench_hf
        if _hf_available():
            h = bench_hf(cfg, B, prompt_len, new_tokens, dtype, repeats, seed)
            row.update(h, rollout_speedup_vs_hf=row["rollout_tokens_per_s"] / h["hf_tokens_per_s"])
    return row


COLUMNS = [("setting", "shapes"), ("batch", "P×K"), ("new_tokens", "new tok"),
           ("rollout_tokens_per_s", "rollout tok/s"), ("hf_tokens_per_s", "HF tok/s"),
           ("rollout_speedup_vs_hf", "× HF"), ("score_s", "score s"), ("update_s", "update s"),
           ("update_tflops", "update TFLOP/s (6N)"), ("mfu", "MFU (6N)"), ("mfu_4n", "MFU (4N)"),
           ("peak_mem_gb", "peak GiB")]


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m launch.bench grpo", description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (seconds)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--mini_batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--no_remat", action="store_true", help="keep activations instead of recomputing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no_hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU")
    ap.add_argument("--out", default="", help="append the result as a JSON line to this file")
    a = ap.parse_args(argv or [])
    row = run(a.small, a.prompts, a.k, a.prompt_len, a.new_tokens, a.mini_batch, a.rank, a.targets,
              a.repeats, not a.no_hf, a.peak_tflops, remat=not a.no_remat)
    row["device"] = device_info()["device"]
    print(markdown_table([row], COLUMNS))
    append_jsonl(a.out or None, {**row, **device_info()})
    return [row]
