"""Generation throughput: `python -m launch.bench generate --model=qwen2.5-1.5b --batch=64 ...`.

Random weights at a preset's real shapes (`config.preset`, `init_params` jitted on the device, no
downloads), random full-length prompts, fixed-length sampling: temperature 1, top_k=50, top_p=1
(transformers' defaults) and min_new_tokens = max_new_tokens so no row stops early. The same
settings drive transformers' `generate` when torch with CUDA is importable (same process, same
shapes, random bf16 weights, default dynamic cache and attention).

Reported per config: tokens/s = B * N / (prefill + decode wall time), ms per decode step,
prefill and compile time, peak device memory, and the memory-roofline fraction
    roofline = (weight bytes + KV bytes at the mean filled length P + N/2) / copy bandwidth
    fraction = roofline / measured decode-step time,
where copy bandwidth (bytes read + written per second) is measured in the same run.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

# Leave GPU memory for the transformers baseline in the same process (JAX preallocates 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

ALL_SHAPES = [  # the benchmark shapes: (model, batch, prompt_len, new_tokens)
    ("gpt2-medium", 64, 64, 256),
    ("qwen2.5-1.5b", 64, 128, 256),
    ("smollm2-135m", 64, 128, 256),
    ("gpt2-medium", 128, 8, 32),
]
TOP_K = 50
COLUMNS = [("model", "model"), ("batch", "B"), ("prompt_len", "P"), ("new_tokens", "N"), ("dtype", "dtype"),
           ("tokens_per_s", "tok/s"), ("ms_per_step", "ms/step"), ("prefill_ms", "prefill ms"),
           ("compile_s", "compile s"), ("peak_mem_gib", "peak GiB"), ("roofline_frac", "roofline"),
           ("hf_tokens_per_s", "HF tok/s"), ("speedup_vs_hf", "× HF")]


def _hf_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def bench_hf(cfg, batch: int, prompt_len: int, new_tokens: int, dtype: str, repeats: int, seed: int = 0
             ) -> Dict[str, Any]:
    """transformers `generate` on the same shapes (random weights) -> {hf_s, hf_tokens_per_s}."""
    import time
    import torch
    import transformers as tf
    from jaxrl_sparse.models.config import to_hf_config
    hf = dict(to_hf_config(cfg))
    model_type = hf.pop("model_type")
    hf_cfg = tf.AutoConfig.for_model(model_type, **hf)
    torch.manual_seed(seed)
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=tdt).to("cuda").eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    kw = dict(do_sample=True, temperature=1.0, top_k=TOP_K, top_p=1.0, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=pad)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    del model
    torch.cuda.empty_cache()
    s = sorted(times)[len(times) // 2]
    return {"hf_s": s, "hf_tokens_per_s": batch * new_tokens / s}


def bench_one(model: str, batch: int, prompt_len: int, new_tokens: int, dtype: str = "bfloat16",
              repeats: int = 3, hf: bool = True, seed: int = 0, copy_bw: Optional[float] = None,
              layer_unroll: Optional[int] = None, steps_per_sync: int = 1,
              layer_loop: Optional[bool] = None) -> Dict[str, Any]:
    """One benchmark row (see module doc)."""
    import jax
    import jax.numpy as jnp
    from jaxrl_sparse.bench import common
    from jaxrl_sparse.checkpoint import tree_nbytes
    from jaxrl_sparse.generate import generate
    from jaxrl_sparse.models.config import preset
    from jaxrl_sparse.models.decoder import forward, init_cache, init_params

    cfg = preset(model, param_dtype=dtype, dtype=dtype)
    key = jax.random.key(seed)
    params = jax.jit(lambda k: init_params(cfg, k))(key)
    prompts = jax.random.randint(jax.random.fold_in(key, 1), (batch, prompt_len), 0, cfg.vocab_size, jnp.int32)
    mask = jnp.ones((batch, prompt_len), jnp.int32)
    prompts.block_until_ready()

    def run():
        return generate(params, cfg, prompts, mask, jax.random.fold_in(key, 2), max_new_tokens=new_tokens,
                        temperature=1.0, top_k=TOP_K, top_p=1.0, min_new_tokens=new_tokens,
                        fixed_length=True, bucket=False, layer_unroll=layer_unroll,
                        steps_per_sync=steps_per_sync, layer_loop=layer_loop)

    t = common.time_calls(run, repeats=repeats)
    out = t["out"]
    assert int(out.n_steps) == new_tokens and bool(out.mask.all()), "fixed-length run stopped early"

    S = prompt_len + new_tokens
    prefill = jax.jit(lambda p, x, m: forward(p, cfg, x, m, cache=init_cache(cfg, batch, S), logits_last=1).logits)
    tp = common.time_calls(lambda: prefill(params, prompts, mask), repeats=repeats)
    total, pre = t["median_s"], tp["median_s"]
    step = max(total - pre, 1e-9) / max(new_tokens - 1, 1)

    copy_bw = copy_bw or common.copy_bandwidth()
    itemsize = jnp.dtype(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32).itemsize
    w_bytes = tree_nbytes(params)
    kv_bytes = (2 * cfg.num_layers * batch * (prompt_len + new_tokens / 2) * cfg.num_kv_heads
                * cfg.head_dim * itemsize)
    roof_step = (w_bytes + kv_bytes) / copy_bw
    peak = common.peak_memory_bytes()
    from jaxrl_sparse.generate import cache_slots
    from jaxrl_sparse.models.decoder import decode_attention_impl
    decode_attention = decode_attention_impl(cfg, 1, cache_slots(prompt_len, new_tokens, steps_per_sync))
    row = dict(model=model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, dtype=dtype,
               tokens_per_s=batch * new_tokens / total, total_s=total, ms_per_step=step * 1e3,
               prefill_ms=pre * 1e3, compile_s=max(t["first_s"] - total, 0.0),
               peak_mem_gib=None if peak is None else peak / 2 ** 30, weight_gib=w_bytes / 2 ** 30,
               kv_gib=kv_bytes / 2 ** 30, copy_tb_s=copy_bw / 1e12, roofline_ms_per_step=roof_step * 1e3,
               roofline_frac=roof_step / step, top_k=TOP_K, layer_unroll=layer_unroll, steps_per_sync=steps_per_sync,
               layer_loop=layer_loop, attention=decode_attention, **common.device_info())
    del params, out
    if hf:
        h = bench_hf(cfg, batch, prompt_len, new_tokens, dtype, repeats, seed)
        row.update(h, speedup_vs_hf=row["tokens_per_s"] / h["hf_tokens_per_s"])
    return row


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m launch.bench generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-1.5b", help="preset name (real shapes, random weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no_hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--all", action="store_true", help="run the four issue shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps_per_sync", type=int, default=1,
                    help="decode steps per while-loop iteration (each loop test syncs with the host)")
    ap.add_argument("--layer_unroll", type=int, default=None,
                    help="layers per decode-scan iteration (default: all on GPU, 1 on CPU)")
    ap.add_argument("--layer_loop", type=int, default=None, choices=[0, 1],
                    help="1: one KV buffer per layer, layers unrolled; 0: stacked cache in a layer scan "
                         "(default: 1 on accelerators)")
    ap.add_argument("--out", default=None, help="append one JSON line per config here")
    a = ap.parse_args(argv)
    from jaxrl_sparse.errors import UserError
    from jaxrl_sparse.models.config import preset
    for name, v in (("batch", a.batch), ("prompt_len", a.prompt_len), ("new_tokens", a.new_tokens),
                    ("repeats", a.repeats)):
        if v < 1:
            raise UserError(f"--{name}={v} must be >= 1")
    shapes = ALL_SHAPES if a.all else [(a.model, a.batch, a.prompt_len, a.new_tokens)]
    for m, *_ in shapes:
        preset(m)  # unknown names fail before any work
    from jaxrl_sparse.bench import common
    hf = not a.no_hf and _hf_available()
    bw = common.copy_bandwidth()
    rows = []
    print(common.markdown_table([], COLUMNS))
    for m, b, p, n in shapes:
        row = bench_one(m, b, p, n, a.dtype, a.repeats, hf, a.seed, copy_bw=bw, layer_unroll=a.layer_unroll,
                        steps_per_sync=a.steps_per_sync,
                        layer_loop=None if a.layer_loop is None else bool(a.layer_loop))
        rows.append(row)
        print(common.markdown_table([row], COLUMNS).split("\n")[-1], flush=True)
        common.append_jsonl(a.out, row)
    return rows
