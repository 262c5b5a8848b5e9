"""Evolution strategies on math word problems: weight perturbation (WP, full or low-rank) and node
perturbation (NP), replacing the seed's `wp_llm_gsm8k.py` / `np_llm_gsm8k.py`.

One iteration (`train`):
  problems  the same n_train problems every iteration (the seed's), or with --train_pool=P > n_train
            n_train of P drawn afresh (`train_rows`)
  seeds     N member seeds from fold_in(seed_key, iteration); member key = fold_in(noise_key, seed)
  generate  NP / low-rank WP: the whole population as ONE batch of N * n_train rows (member-major),
            sharded over the mesh's 'data' axis; full-rank WP: --gpu_threads members per call (0 = as
            many as fit in memory), vmapped, theta + sigma eps built inside the jit from the fp32 master
  reward    exact numeric match per row, mean per member -> r [N] -> z-score
  update    direction g: WP 1/N sum z eps;  NP the replayed 1/(N sigma) sum z eps x^T
            (es_math.np_replay_delta); applied by --optimizer: theta += alpha g (sgd, the seed's) or Adam
Only seeds are stored. Every random choice is a function of (meta_seed, iteration), so a resumed
run writes the same `reward_history.csv` as an uninterrupted one.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import gc
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse import checkpoint, parallel
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.metrics import is_writer
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import ActNoise
from jaxrl_sparse.rl import es_math
from jaxrl_sparse.tasks import math_task
from jaxrl_sparse.transforms import perturb

PRECISIONS = {"no": jnp.float32, "fp16": jnp.bfloat16, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ESConfig:
    """Every knob of an ES run (flags map 1:1; the seed's flags first, with its defaults)."""
    method: str = ""                  # wp | np; '' = np when --np_include is given, else wp
    model_name: str = "Qwen/Qwen2.5-1.5B-Instruct"  # registry name, HF id, HF folder, .gguf, or tiny-random
    hf_cache_dir: str = ""            # HF cache for hub downloads (sets HF_HUB_CACHE/HF_DATASETS_CACHE); seed default was a private path
    mixed_precision: str = "fp16"     # compute dtype with fp32 master weights: no=fp32, bf16, fp16 (mapped to bf16: same 16-bit bandwidth, no loss scaling)
    gpu_threads: int = 0              # population members decoded concurrently per device (seed default 1); 0 = all: NP / low-rank WP decode the whole population as one batch, G > 0 decodes G x n_devices members per call; full-rank WP: G members per call, one weight copy each (rows split over the devices), 0 = as many as fit in device memory
    n_train: int = 64                 # training problems per iteration (the same set every iteration, as in the seed, unless --train_pool)
    train_pool: int = 0               # problems the training batches are drawn from: 0 = the seed's fixed set of n_train problems every iteration; P >= n_train = each iteration trains on n_train problems drawn without replacement from a pool of P training problems (disjoint from the eval set), chosen by (meta_seed, iteration) so runs are deterministic and resume identically
    n_eval: int = 100                 # evaluation problems
    n_iters: int = 100                # ES iterations
    pop_size: int = 30                # population size N
    sigma: float = 0.0                # noise scale; 0 = the seed's default (0.001 WP / 0.005 NP)
    alpha: float = 0.001              # step size
    meta_seed: int = 42               # every key (seeds, noise, sampling, data order) derives from it
    eval_interval: int = 20           # evaluate every N iterations (and before / after training)
    skip_eval: bool = False           # no accuracy evaluation (baseline completions still written)
    verbose: bool = False             # print per-iteration reward statistics and phase timings
    aggressive_gc: bool = False       # gc.collect() + jax.clear_caches() between phases (frees memory; recompiles every phase)
    visualization_dir: str = ""       # output folder; '' = ./out_{method}_gsm8k
    # NP (the seed's np_llm_gsm8k.py)
    np_include: str = ""              # NP sites: head | attn | mlp | all (or a comma list); '' = all
    last_k: int = 0                   # NP: only the last K transformer blocks (0 = all)
    np_fast_noise: bool = True        # JAX noise is always counter-based and vectorised (regenerated from keys); False is accepted and reported, same result
    np_sync_every: int = 1            # NP: apply (and all-reduce) the accumulated replay update every K iterations
    np_micro_batch_size: int = 4      # NP replay: population members per replay micro-batch (rounded down to a divisor of pop_size)
    np_max_tok_chunk: int = 256       # NP replay: tokens per chunk (KV cache carried between chunks)
    np_credit: str = "member"         # NP: member = the seed's update (every row of member n weighted by its z_n); row = each row weighted by its own reward, centred per prompt across members (z over all rows): the noise of one row cannot change another row's reward, so dropping those terms keeps the estimate unbiased and removes most of its variance
    np_noise_prompt: bool = True      # NP: noise also on the prompt's forward (the seed's hooks perturb every forward); False = only decode steps carry noise and the update sums over response tokens (the first prompt token's massive activations otherwise dominate the update: BUILD_NOTES.md)
    np_capture: bool = True           # NP with --last_k>0: generation keeps the residual stream entering block L-K and the replay runs only the last K blocks from it (same update; costs rows x (prompt+new) x hidden x 2 bytes); False = replay every block
    # beyond the seed
    wp_rank: int = 0                  # WP: >0 = low-rank perturbations A B^T / sqrt(r) (EGGROLL); population decodes as one batch
    wp_include: str = ""              # WP: regex of perturbed parameters ('' = all for full rank; projections for low rank)
    optimizer: str = "sgd"            # how the ES direction g is applied: sgd = the seed's theta += alpha g; adam = Adam with learning rate alpha on g (per-coordinate normalised step; momentum averages the estimates of successive iterations, as in Salimans et al. 2017)
    adam_b1: float = 0.9              # --optimizer=adam: first-moment decay
    adam_b2: float = 0.999            # --optimizer=adam: second-moment decay
    antithetic: bool = False          # mirrored pairs (+eps, -eps) sharing a seed (pop_size must be even): WP weight noise, NP activation noise
    data: str = "gsm8k"               # gsm8k (hub) | jsonl | generated (offline GSM8K-style problems)
    train_file: str = ""              # JSONL with question/answer per line (data=jsonl)
    eval_file: str = ""               # JSONL for evaluation (data=jsonl; default: the train file)
    chat: bool = True                 # wrap prompts in the tokenizer's chat template
    system_prompt: str = math_task.DEFAULT_SYSTEM  # system turn of the chat prompt ('' = none)
    max_prompt_len: int = 320         # prompt tokens kept (from the end)
    max_new_tokens: int = 256         # generated tokens per answer
    greedy: bool = True               # greedy decoding (noise is the only randomness); False = sample
    temperature: float = 1.0          # sampling temperature when --nogreedy
    save_every: int = 10              # Orbax checkpoint every N iterations (and at the end)
    keep_opt_state: int = 1           # newest checkpoints keeping optimizer moments / NP accumulators (resuming); 0 = all
    export_final: bool = True         # write final_model/ as a HF folder
    mesh: str = ""                    # device mesh 'data:N,fsdp:M' ('' = all devices on data); population rows split over data x fsdp, master weights over fsdp

    # ------------------------------------------------------------------ derived settings
    @property
    def resolved_method(self) -> str:
        return self.method or ("np" if self.np_include else "wp")

    @property
    def resolved_sigma(self) -> float:
        return self.sigma or (0.005 if self.resolved_method == "np" else 0.001)

    @property
    def out_dir(self) -> str:
        return self.visualization_dir or f"./out_{self.resolved_method}_gsm8k"

    def validate(self) -> "ESConfig":
        m = self.resolved_method
        if m not in ("wp", "np"):
            raise UserError(f"--method={self.method!r}; choose wp or np")
        if m == "wp" and self.np_include:
            raise UserError("--np_include is a node-perturbation flag but --method=wp; drop one of them")
        if self.mixed_precision not in PRECISIONS:
            raise UserError(f"--mixed_precision={self.mixed_precision!r}; choose no, fp16 or bf16")
        for name in ("n_train", "n_iters", "pop_size", "np_sync_every", "np_micro_batch_size",
                     "np_max_tok_chunk", "max_new_tokens", "save_every", "eval_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        checkpoint.check_keep_resume(self.keep_opt_state, "--keep_opt_state")
        if self.train_pool and self.train_pool < self.n_train:
            raise UserError(f"--train_pool={self.train_pool} is smaller than --n_train={self.n_train}; "
                            f"use 0 (the fixed set) or at least {self.n_train}")
        if self.pop_size < 2:
            raise UserError("--pop_size must be >= 2 (rewards are z-scored across the population)")
        if self.antithetic and self.pop_size % 2:
            raise UserError(f"--antithetic needs an even --pop_size, got {self.pop_size}")
        if self.sigma < 0 or self.alpha < 0 or self.gpu_threads < 0 or self.wp_rank < 0:
            raise UserError("--sigma, --alpha, --gpu_threads and --wp_rank must be >= 0")
        if self.optimizer not in es_math.OPTIMIZERS:
            raise UserError(f"--optimizer={self.optimizer!r}; choose one of {', '.join(es_math.OPTIMIZERS)}")
        if not (0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1):
            raise UserError(f"--adam_b1 and --adam_b2 must be in [0, 1), got {self.adam_b1}, {self.adam_b2}")
        if self.np_credit not in ("member", "row"):
            raise UserError(f"--np_credit={self.np_credit!r}; choose member or row")
        if m == "np":
            perturb.parse_np_include(self.np_include)
        return self


# ----------------------------------------------------------------------------- model loading
def tiny_random_model(seed: int = 0):
    """(ModelConfig, fp32 params, tokenizer) of a 2-layer random Llama with a character tokenizer:
    the `--model_name=tiny-random` smoke-test model (no files needed)."""
    from jaxrl_sparse.models.decoder import init_params
    tok = char_tokenizer()
    cfg = ModelConfig("llama", 128, 32, 64, 2, 4, 2, 8, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id).validate()
    return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed)), tok


def char_tokenizer():
    """A real HF fast tokenizer over printable ASCII characters, with a tiny chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>",
                                  additional_special_tokens=specials[4:])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def load_es_model(ecfg: ESConfig):
    """(ModelConfig with the compute dtype, fp32 master params, tokenizer)."""
    dt = "bfloat16" if PRECISIONS[ecfg.mixed_precision] == jnp.bfloat16 else "float32"
    if ecfg.model_name == "tiny-random":
        cfg, params, tok = tiny_random_model(ecfg.meta_seed)
        return cfg.replace(dtype=dt), params, tok
    from jaxrl_sparse.models import load_model
    lm = load_model(ecfg.model_name, param_dtype="float32", dtype=dt)
    return lm.config, lm.params, lm.tokenizer


# ----------------------------------------------------------------------------- population rollouts
def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  params)


class _Static:
    """Equality / hash by the settings, so a new run with the same settings reuses compiles."""

    def _key(self):
        return (type(self).__name__,) + tuple(str(getattr(self, k)) for k in self._fields)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


class CastFn(_Static):
    """params_fn: the fp32 master cast to the compute dtype once per generate call (hashable)."""
    _fields = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, params):
        return _cast(params, self.dtype)


class PerturbFn(_Static):
    """params_fn for full-rank WP: bundle {'model', 'key', 'sign'} -> theta + sign sigma eps(key), cast.

    sign (a float32 scalar): +1, or -1 for the negative member of an antithetic pair."""
    _fields = ("sigma", "paths", "dtype")

    def __init__(self, sigma: float, paths, dtype):
        self.sigma, self.paths, self.dtype = sigma, tuple(paths), dtype

    def __call__(self, bundle):
        key = jax.random.wrap_key_data(bundle["key"])
        return perturb.perturbed_params(bundle["model"], key, self.sigma * bundle["sign"], self.paths, self.dtype)


class LowRankFn(_Static):
    """params_fn for low-rank WP: bundle {'model', 'keys' [N, 2], 'signs' [N]} -> cast model; stashes
    the population's factors (computed inside the jit; A_n carries sign_n, -1 for the negative member
    of an antithetic pair) for `perturb.lowrank_interceptor`."""
    _fields = ("paths", "rank", "dtype")

    def __init__(self, paths, rank: int, dtype):
        self.paths, self.rank, self.dtype = tuple(paths), rank, dtype
        self.factors: Dict[str, Any] = {}

    def __call__(self, bundle):
        keys = jax.vmap(jax.random.wrap_key_data)(bundle["keys"])
        fac = perturb.population_lowrank_factors(bundle["model"], keys, self.paths, self.rank)
        sg = bundle["signs"].astype(jnp.float32)
        self.factors = {p: (a * sg.reshape((-1,) + (1,) * (a.ndim - 1)), b) for p, (a, b) in fac.items()}
        return _cast(bundle["model"], self.dtype)


def gen_kwargs(ecfg: ESConfig, tok, mcfg: ModelConfig) -> Dict[str, Any]:
    eos = mcfg.eos_token_id if mcfg.eos_token_id is not None else tok.eos_token_id
    return dict(max_new_tokens=ecfg.max_new_tokens, greedy=ecfg.greedy, temperature=ecfg.temperature,
                eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos)


def row_noise_keys(mkeys, n_rows: int):
    """[N * M, 2] uint32: row j of member n gets fold_in(member_key_n, j) (member-major rows)."""
    def per_member(k):
        return jax.vmap(lambda j: jax.random.key_data(jax.random.fold_in(k, j)))(jnp.arange(n_rows))
    return jax.vmap(per_member)(mkeys).reshape(-1, 2)


def np_generate(params, mcfg, tokens, mask, mkeys, scales, key, gkw, params_fn, mesh=None,
                capture_layer: int = -1, noise_in_prompt: bool = True, signs=None):
    """NP rollouts: prompts [M, P] tiled over the N members (one batch), one noise stream per row.

    capture_layer j >= 0: out.hidden [N*M, P+N_new, D] is the residual stream entering block j
    (the replay's start, `np_capture_layer`). The blocks before the first perturbed one are
    prefilled once per prompt, not once per member (`generate`'s prefill_shared_layers); with
    noise_in_prompt=False only decode steps carry noise and all blocks but the last are shared.
    signs [N] (None = all +1): member n's rows get sign_n times its noise (antithetic pairs share a
    seed; the replay needs the same row signs: `np.repeat(signs, M)`).
    Returns (GenerateOutput [N*M], row_keys [N*M, 2], tokens [N*M, P], mask [N*M, P]).
    """
    from jaxrl_sparse.generate import generate
    N, M = mkeys.shape[0], tokens.shape[0]
    rk = row_noise_keys(mkeys, M)
    t, m = np.tile(tokens, (N, 1)), np.tile(mask, (N, 1))
    row_signs = None if signs is None else np.repeat(np.asarray(signs, np.float32), M)
    out = generate(params, mcfg, t, m, key, noise=ActNoise(rk, *scales, sign=row_signs), params_fn=params_fn,
                   mesh=mesh, capture_layer=capture_layer, prefill_shared_layers=mcfg.num_layers,
                   noise_in_prompt=noise_in_prompt, **gkw)
    return out, rk, t, m


def np_replay_rows(prompt_tokens, prompt_mask, tokens, mask, noise_in_prompt: bool = True):
    """Host arrays of an NP replay from a generation: (tokens [R, P+N], mask, contrib, noise_start).

    noise_start: None, or each row's prompt length when generation ran with noise_in_prompt=False
    (positions are cumsum(mask) - 1, so the response starts there); contrib then leaves out the prompt."""
    pm = np.asarray(prompt_mask).astype(bool)
    seq = np.concatenate([np.asarray(prompt_tokens), np.asarray(tokens)], axis=1)
    seq_mask = np.concatenate([pm, np.asarray(mask).astype(bool)], axis=1)
    contrib = np.asarray(es_math.np_contrib_mask(pm, mask, prompt=noise_in_prompt))
    start = None if noise_in_prompt else pm.sum(axis=1).astype(np.int32)
    return seq, seq_mask, contrib, start


def lowrank_generate(params, mcfg, tokens, mask, mkeys, sigma, key, gkw, lr_fn: LowRankFn, mesh=None,
                     signs=None):
    """Low-rank WP rollouts: N members x M prompts in one batch; row b uses member b // M's factors.

    signs [N] (default +1): member n is perturbed by sign_n sigma A_n B_n^T / sqrt(r) (antithetic pairs
    share a seed with signs +1 / -1)."""
    from jaxrl_sparse.generate import generate
    N = mkeys.shape[0]
    signs = np.ones(N, np.float32) if signs is None else np.asarray(signs, np.float32)
    bundle = {"model": params, "keys": jax.vmap(jax.random.key_data)(mkeys), "signs": signs}
    with perturb.lowrank_interceptor(lambda: lr_fn.factors, sigma, N):
        return generate(bundle, mcfg, np.tile(tokens, (N, 1)), np.tile(mask, (N, 1)), key,
                        params_fn=lr_fn, mesh=mesh, **gkw)


def fullrank_generate(params, mcfg, tokens, mask, mkeys, key, gkw, pfn: PerturbFn, mesh=None, group: int = 1,
                      signs=None):
    """Full-rank WP rollouts, theta + sigma eps built inside the jit from the fp32 master.

    group G: members decoded per call. G = 1: one `generate` call per member. G > 1: one compiled
    program per group shape (`_grouped_sampler`, the sampler's traced program vmapped over the
    members) decodes G members at once, each member's M rows with its own perturbed weight copy
    (batched matmuls); a last partial group (N % G members) compiles one more shape.
    G = 0: `auto_fullrank_group` (from device memory).
    Every member uses the same sampling `key`, so tokens equal the one-by-one path's. A member's
    rows are sharded over the mesh's data axes as for one `generate` call. signs [N] (default +1):
    member n decodes with theta + sign_n sigma eps_n (antithetic pairs share a seed, signs +1 / -1).
    Returns (tokens [N*M, T], mask [N*M, T]) numpy, member-major.
    """
    from jaxrl_sparse.generate import generate
    N = mkeys.shape[0]
    kd = np.asarray(parallel.to_host(jax.vmap(jax.random.key_data)(mkeys)))
    sg = np.ones(N, np.float32) if signs is None else np.asarray(signs, np.float32)
    if group <= 0:
        group = auto_fullrank_group(params, mcfg, tokens, mesh, gkw, N, pfn.dtype)
    toks, masks = [], []
    if min(group, N) == 1:
        for n in range(N):
            out = generate({"model": params, "key": kd[n], "sign": sg[n]}, mcfg, tokens, mask, key,
                           params_fn=pfn, mesh=mesh, **gkw)
            t, m = parallel.to_host((out.tokens, out.mask))
            toks.append(t)
            masks.append(m)
        return np.concatenate(toks), np.concatenate(masks)
    from jaxrl_sparse.generate import prepare   # generate's own host-side preparation (no noise here)
    spec, msh, (p_, t_, m_, k_, _, stops) = prepare(params, mcfg, tokens, mask, key, mesh=mesh, **gkw)
    fn = _grouped_sampler(mcfg, spec, pfn, msh)
    rep = None if msh is None else jax.sharding.NamedSharding(msh, jax.sharding.PartitionSpec())
    for s in range(0, N, group):
        g_keys, g_signs = kd[s:s + group], sg[s:s + group]
        if rep is not None:
            g_keys, g_signs = parallel.put(g_keys, rep), parallel.put(g_signs, rep)
        out = fn(p_, g_keys, g_signs, t_, m_, k_, stops)          # tokens, mask [G, M, T]
        t, m = parallel.to_host((out.tokens, out.mask))
        toks.append(t.reshape(-1, t.shape[-1]))
        masks.append(m.reshape(-1, m.shape[-1]))
    return np.concatenate(toks), np.concatenate(masks)


@functools.lru_cache(maxsize=16)
def _grouped_sampler(mcfg, spec, pfn: PerturbFn, mesh):
    """jit: (params, member keys [G, 2], signs [G], tokens [M, Pb], mask, key, stops) -> GenerateOutput [G, M, ...].

    Member g decodes with `pfn({'model': params, 'key': keys[g], 'sign': signs[g]})` (as one `generate` call with
    params_fn=pfn); the sampler's traced program (`generate._decode_fn`) is vmapped over the G
    perturbed copies. The copies are built by `lax.map`, one member at a time, so the fp32 noise
    temporaries of only one member are alive (a vmapped build held G members' when XLA did not fuse
    the noise into the cast: 60 MB of temporaries per 12 MB bf16 copy on CPU). jit's cache keys on G.
    """
    from jaxrl_sparse.generate import _decode_fn
    from jaxrl_sparse.models.decoder import xla_attention
    run = _decode_fn(mcfg, spec, None, mesh)

    def group(params, kd, signs, tokens, mask, key, stops):
        pp = jax.lax.map(lambda ks: pfn({"model": params, "key": ks[0], "sign": ks[1]}), (kd, signs))
        with xla_attention():  # cuDNN attention does not batch under vmap (decoder.xla_attention)
            return jax.vmap(run, in_axes=(0, None, None, None, None, None))(pp, tokens, mask, key, None, stops)
    return jax.jit(group)


def kv_bytes_per_token(mcfg: ModelConfig) -> int:
    """KV-cache bytes per row per slot: layers x (k, v) x kv_heads x head_dim x compute itemsize."""
    return mcfg.num_layers * 2 * mcfg.num_kv_heads * mcfg.head_dim * jnp.dtype(mcfg.dtype).itemsize


def fullrank_group_size(pop: int, free_bytes: Optional[int], weight_bytes: int, kv_token_bytes: int,
                        rows: int, seq_len: int, vocab_size: int, margin: float = 0.7,
                        weight_copies: int = 2, kv_copies: int = 2) -> int:
    """Members decoded per call by full-rank WP when --gpu_threads=0 (auto), from device memory.

    Per member, on one device: `weight_copies` x its perturbed weights in the compute dtype
    (`weight_bytes`; 2: the sampler's per-layer split of the stacked copy coexists with it for a
    moment), `kv_copies` x the KV cache of its rows (rows x seq_len x kv_token_bytes; 2: prefill
    cache and loop carry, and the vmapped loop's select when members stop at different steps),
    plus fp32 logits (rows x vocab x 4). G = floor(margin x free_bytes / per member), clipped to
    [1, pop], then evened out over the ceil(pop / G) calls (pop 30 at G 12 -> G 10, 3 calls) so the
    calls have at most two shapes (compiles). free_bytes None (no memory statistics, e.g. CPU) -> pop.
    """
    if free_bytes is None:
        return pop
    per_member = (weight_copies * weight_bytes + kv_copies * rows * seq_len * kv_token_bytes
                  + rows * vocab_size * 4)
    g = int(max(1, min(pop, (margin * max(free_bytes, 0)) // per_member)))
    return -(-pop // -(-pop // g))


def auto_fullrank_group(params, mcfg, tokens, mesh, gkw, pop: int, dtype) -> int:
    """`fullrank_group_size` for this model and batch: free memory = bytes_limit - bytes_in_use of
    the first local device; rows per device = M / the mesh's row shards; seq = prompt bucket + new."""
    from jaxrl_sparse.generate import _default_mesh, bucket_length
    stats = jax.local_devices()[0].memory_stats()
    free = None if not stats or "bytes_limit" not in stats else stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    itemsize = jnp.dtype(dtype).itemsize
    wbytes = sum(int(np.prod(x.shape)) * (itemsize if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype.itemsize)
                 for x in jax.tree_util.tree_leaves(params))
    M, P0 = np.shape(tokens)
    msh = _default_mesh(M) if mesh is None else (None if mesh is False else mesh)
    rows = -(-M // (1 if msh is None else parallel.batch_size_multiple(msh)))
    seq = (bucket_length(P0) if gkw.get("bucket", True) else P0) + gkw["max_new_tokens"] + gkw.get("steps_per_sync", 1)
    return fullrank_group_size(pop, free, wbytes, kv_bytes_per_token(mcfg), rows, seq, mcfg.vocab_size)


def train_rows(meta_seed: int, it: int, pool: int, n: int) -> np.ndarray:
    """[n] sorted distinct row indices in [0, pool): iteration `it`'s training problems under
    --train_pool, drawn without replacement by numpy's generator seeded with (meta_seed, it), so a
    resumed run draws the same problems."""
    rng = np.random.default_rng([meta_seed & 0xFFFFFFFF, it])
    return np.sort(rng.choice(pool, n, replace=False))


def member_chunks(n_members: int, threads: int) -> List[slice]:
    """Slices of the population decoded per call: all at once (threads 0), else threads x devices."""
    step = n_members if threads <= 0 else max(1, threads * jax.device_count())
    return [slice(s, min(n_members, s + step)) for s in range(0, n_members, step)]


def decode_rows(tok, tokens, mask) -> List[str]:
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    return tok.batch_decode([row[m].tolist() for row, m in zip(tokens, mask)], skip_special_tokens=True)


def row_rewards(tok, tokens, mask, golds, n_members: int) -> np.ndarray:
    """[N, M] exact-match reward of every row (rows member-major, golds for one member's rows).

    Each process decodes and scores its own share of the rows (`parallel.process_rows`)."""
    rows = parallel.process_rows(len(tokens)) if len(tokens) % jax.process_count() == 0 else slice(None)
    texts = decode_rows(tok, np.asarray(tokens)[rows], np.asarray(mask)[rows])
    r = math_task.score_completions(texts, (list(golds) * n_members)[rows])
    if rows != slice(None):
        r = parallel.allgather_rows(np.asarray(r, np.float32))
    return np.asarray(r, np.float32).reshape(n_members, -1)


def np_micro_members(pop: int, want: int) -> int:
    """Largest divisor of `pop` that is <= want."""
    return max(d for d in range(1, min(pop, want) + 1) if pop % d == 0)


def np_capture_layer(mcfg: ModelConfig, include: str, last_k: int, capture: bool = True) -> int:
    """Block whose input generation keeps for the NP replay: L - last_k when only the last K blocks
    carry noise (attn/mlp sites, last_k > 0, `capture`); -1 (replay every block) otherwise."""
    sites = perturb.parse_np_include(include)
    if not capture or last_k <= 0 or not ({"attn", "mlp"} & set(sites)):
        return -1
    return mcfg.num_layers - last_k


@functools.lru_cache(maxsize=8)
def _replay_fn(mcfg, include, last_k, tok_chunk, micro_rows, cdt):
    """jit: (params, tokens, mask, contrib, row_keys, row_coef, scales, start_hidden=None) -> {path: Delta}.

    start_hidden [R, S, D]: the stream entering block L - last_k captured during generation; the
    replay then runs only the last_k blocks (`es_math.np_replay_delta`)."""
    def fn(params, tokens, mask, contrib, row_keys, row_coef, scales, start_hidden=None, noise_start=None,
           noise_sign=None):
        return es_math.np_replay_delta(params, mcfg, tokens, mask, contrib, row_keys, row_coef, scales,
                                       include, last_k, tok_chunk=tok_chunk, micro_rows=micro_rows,
                                       compute_dtype=cdt, start_hidden=start_hidden, noise_start=noise_start,
                                       noise_sign=noise_sign)
    return jax.jit(fn)


SGD_STEP = ("sgd", 0.9, 0.999)   # (optimizer, adam_b1, adam_b2) of the seed's step theta += alpha g


@functools.lru_cache(maxsize=8)
def _wp_step_fn(alpha, paths, rank: int = 0, opt: Tuple = SGD_STEP,
                layout: Optional[parallel.Layout] = None):
    """jit (params, optimizer state, member keys, coefs) -> (params, state): the WP direction (full
    rank, or low rank when rank > 0) applied by the ES optimizer opt = (name, b1, b2); layout: the
    params' shardings (kept)."""
    def fn(params, state, keys, coefs):
        g = (es_math.lowrank_delta(params, keys, coefs, paths, rank) if rank
             else es_math.wp_delta(params, keys, coefs, paths))
        return es_math.optimizer_step(params, g, state, optimizer=opt[0], alpha=alpha, b1=opt[1], b2=opt[2])
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=None if layout is None else (layout.tree, None))


@functools.lru_cache(maxsize=8)
def _opt_step_fn(alpha, opt: Tuple = SGD_STEP, layout: Optional[parallel.Layout] = None):
    """jit (params, direction {path: g}, optimizer state) -> (params, state) (the NP update)."""
    step = lambda params, g, state: es_math.optimizer_step(params, g, state, optimizer=opt[0], alpha=alpha,
                                                           b1=opt[1], b2=opt[2])
    return jax.jit(step, donate_argnums=(0, 2), out_shardings=None if layout is None else (layout.tree, None))


# ----------------------------------------------------------------------------- outputs
_REWARD_COLS = ["iteration", "candidate_index", "seed", "train_reward"]


def _rewrite_csv(path: str, cols, keep) -> None:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if keep(r)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


def _append_csv(path: str, cols, rows) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, cols).writerows(rows)


def plot_eval(path_csv: str, path_png: str, title: str) -> Optional[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([int(r["iteration"]) for r in rows], [float(r["eval_accuracy"]) for r in rows], "o-")
    ax.set_xlabel("iteration")
    ax.set_ylabel("eval accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png


# ----------------------------------------------------------------------------- the loop
def train(ecfg: ESConfig, *, progress: bool = True, stop_after: Optional[int] = None,
          loaded=None) -> Dict[str, Any]:
    """Runs (or resumes from `<out_dir>/checkpoints`) an ES run; returns a summary dict.

    loaded: optional (ModelConfig, params, tokenizer) instead of loading `model_name` (tests).
    stop_after: stop once this many iterations are done in total (simulates an interruption).
    """
    from tqdm.auto import tqdm
    from jaxrl_sparse.generate import generate

    ecfg = ecfg.validate()
    method, sigma, out_dir = ecfg.resolved_method, ecfg.resolved_sigma, os.path.abspath(ecfg.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if ecfg.hf_cache_dir:
        os.environ["HF_HUB_CACHE"] = ecfg.hf_cache_dir
        os.environ["HF_DATASETS_CACHE"] = os.path.join(ecfg.hf_cache_dir, "datasets")
    if not ecfg.np_fast_noise:
        print("note: --np_fast_noise=False has no slower path in JAX: noise is always regenerated "
              "from keys, vectorised; results are identical")
    say = print if ecfg.verbose else (lambda *a, **k: None)

    mcfg, params, tok = loaded if loaded is not None else load_es_model(ecfg)
    mesh = parallel.make_mesh(ecfg.mesh)
    params = parallel.put_params(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params), mesh)
    param_sh = parallel.param_shardings(params, mesh)  # fp32 master (a copy), split over fsdp
    layout = parallel.param_layout(params, mesh)

    def row_mesh(n_rows: int):
        """The mesh for a batch of n_rows; without --mesh, no sharding when the devices do not divide it."""
        if n_rows % parallel.batch_size_multiple(mesh) == 0:
            return mesh
        if ecfg.mesh:
            parallel.check_batch(n_rows, mesh, "an ES batch (pop_size x n_train, or n_eval)")
        return False
    cdt = PRECISIONS[ecfg.mixed_precision]
    mcfg = mcfg.replace(dtype="bfloat16" if cdt == jnp.bfloat16 else "float32")
    gkw = gen_kwargs(ecfg, tok, mcfg)
    # --train_pool: the whole pool encoded once (one padded prompt length: generate compiles once)
    train_p, eval_p = math_task.load_math_splits(ecfg.data, max(ecfg.n_train, ecfg.train_pool), ecfg.n_eval,
                                                 ecfg.meta_seed, train_file=ecfg.train_file,
                                                 eval_file=ecfg.eval_file)
    pad = gkw["pad_token_id"]
    enc = lambda probs: math_task.encode_left_padded(
        tok, math_task.build_math_prompts(tok, [p["question"] for p in probs], ecfg.chat,
                                          ecfg.system_prompt), ecfg.max_prompt_len, pad)
    pool_tok, pool_mask = enc(train_p)
    pool_gold = math_task.gold_answers(train_p)
    ev_tok, ev_mask = enc(eval_p)
    ev_gold = math_task.gold_answers(eval_p)
    N, M = ecfg.pop_size, ecfg.n_train

    def train_batch(it):
        """(tokens [M, P], mask, golds) of iteration it: the fixed set, or `train_rows` of the pool."""
        if len(train_p) <= M:
            return pool_tok, pool_mask, pool_gold
        idx = train_rows(ecfg.meta_seed, it, len(train_p), M)
        return pool_tok[idx], pool_mask[idx], [pool_gold[i] for i in idx]

    root = jax.random.key(ecfg.meta_seed)
    k_seeds, k_noise, k_gen, k_eval = jax.random.split(root, 4)
    cast_fn = CastFn(cdt)

    # ---- method set-up
    if method == "np":
        scales = perturb.np_scales(mcfg, ecfg.np_include, ecfg.last_k, sigma)
        upd_paths = sorted(tree_select_paths(params, perturb.np_param_regex(mcfg, ecfg.np_include)))
        micro = np_micro_members(N, ecfg.np_micro_batch_size) * M
        replay = _replay_fn(mcfg, ecfg.np_include, ecfg.last_k, ecfg.np_max_tok_chunk, micro, cdt)
        cap_layer = np_capture_layer(mcfg, ecfg.np_include, ecfg.last_k, ecfg.np_capture)
    elif ecfg.wp_rank > 0:
        upd_paths = perturb.lowrank_paths(params, ecfg.wp_include)
        lr_fn = LowRankFn(upd_paths, ecfg.wp_rank, cdt)
    else:
        upd_paths = perturb.leaf_paths(params, ecfg.wp_include)
        pfn = PerturbFn(sigma, upd_paths, cdt)
        # members per decode call, fixed for the run (one compile): --gpu_threads, 0 = from free memory
        wp_group = ecfg.gpu_threads or auto_fullrank_group(params, mcfg, pool_tok[:M], row_mesh(M), gkw, N, cdt)
        say(f"full-rank WP: {wp_group} members per decode call")

    opt = (ecfg.optimizer, ecfg.adam_b1, ecfg.adam_b2)
    if method == "np":
        opt_step = _opt_step_fn(ecfg.alpha, opt, layout)
    else:
        wp_step = _wp_step_fn(ecfg.alpha, tuple(upd_paths), ecfg.wp_rank, opt, layout)
    flat_sh, shapes = tree_flat(param_sh), {p: x.shape for p, x in tree_flat(params).items()}
    upd_sh = {p: flat_sh[p] for p in upd_paths}   # directions / moments: placed like their parameters
    zeros = lambda: parallel.put({p: np.zeros(shapes[p], np.float32) for p in upd_paths}, upd_sh)
    state = {"params": params}
    if ecfg.optimizer != "sgd":  # (sgd has no state; leaving the key out keeps sgd checkpoints as before)
        state["opt"] = es_math.optimizer_init(ecfg.optimizer, zeros())
    if method == "np":
        state["np_accum"] = zeros()

    # ---- outputs and resume
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    rh_path = os.path.join(out_dir, "reward_history.csv")
    ev_path = os.path.join(out_dir, "eval_history.csv")
    start = checkpoint.latest_step(ckpt_dir) or 0
    def resume_item():  # optimizer moments, NP accumulators: only the newest checkpoints keep them
        return {k: v for k, v in state.items() if k != "params"} or None

    if start:
        resume = resume_item()
        state = {"params": checkpoint.restore_params(ckpt_dir, start, state["params"]),
                 **(checkpoint.restore_resume(ckpt_dir, start, resume) if resume else {})}
    if is_writer():
        _rewrite_csv(rh_path, _REWARD_COLS, lambda r: int(r["iteration"]) < start)
        _rewrite_csv(ev_path, ["iteration", "eval_accuracy"], lambda r: int(r["iteration"]) < start
                     or (start and int(r["iteration"]) == start))
    meta = {"trainer": "es", "method": method, "model": ecfg.model_name, "es_config": dataclasses.asdict(ecfg),
            "model_config": dataclasses.asdict(mcfg)}

    def save(step):
        checkpoint.save(ckpt_dir, step, {"params": state["params"]}, resume=resume_item(),
                        keep_resume=ecfg.keep_opt_state, metadata={**meta, "step": step}, overwrite=True)

    def evaluate(it, write_completions=False):
        out = generate(state["params"], mcfg, ev_tok, ev_mask, jax.random.fold_in(k_eval, it),
                       params_fn=cast_fn, mesh=row_mesh(len(ev_tok)), **gkw)
        texts = decode_rows(tok, *parallel.to_host((out.tokens, out.mask)))
        acc = float(math_task.score_completions(texts, ev_gold).mean())
        if write_completions and is_writer():
            with open(os.path.join(out_dir, "baseline_completions.txt"), "w") as f:
                for p, t, g in zip(eval_p, texts, ev_gold):
                    f.write(f"=== question\n{p['question']}\n=== gold: {g}\n=== completion\n{t}\n\n")
        return acc

    def phase_gc():
        if ecfg.aggressive_gc:
            gc.collect()
            jax.clear_caches()

    saves = [d for d in range(start + 1, ecfg.n_iters + 1) if d % ecfg.save_every == 0 or d == ecfg.n_iters]
    checkpoint.check_disk(ckpt_dir, len(saves), state["params"], resume_item(), ecfg.keep_opt_state,
                          checkpoint.tree_nbytes(state["params"]) if ecfg.export_final else 0)
    if start == 0:
        if ecfg.skip_eval:
            evaluate(0, write_completions=True)  # completions only
        else:
            acc = evaluate(0, write_completions=True)
            _append_csv(ev_path, ["iteration", "eval_accuracy"], [{"iteration": 0, "eval_accuracy": acc}])
            say(f"baseline eval accuracy {acc:.4f}")
    end = ecfg.n_iters if stop_after is None else min(stop_after, ecfg.n_iters)
    bar = tqdm(range(start, end), initial=start, total=ecfg.n_iters, desc=f"es-{method}",
               disable=not (progress and is_writer()))
    history = []
    for it in bar:
        t0 = time.perf_counter()
        seeds, signs = es_math.iteration_seeds(k_seeds, it, N, ecfg.antithetic)
        mkeys = es_math.member_keys(k_noise, seeds)
        kg = jax.random.fold_in(k_gen, it)
        tr_tok, tr_mask, tr_gold = train_batch(it)
        if method == "np":
            parts = [np_generate(state["params"], mcfg, tr_tok, tr_mask, mkeys[c], scales, jax.random.fold_in(kg, i),
                                 gkw, cast_fn, mesh=row_mesh(len(mkeys[c]) * M), capture_layer=cap_layer,
                                 noise_in_prompt=ecfg.np_noise_prompt, signs=signs[c] if ecfg.antithetic else None)
                     for i, c in enumerate(member_chunks(N, ecfg.gpu_threads))]
            hidden = None  # [N*M, P+N_new, D] on the devices: the replay's start (np_capture_layer)
            if cap_layer >= 0:
                hidden = parts[0][0].hidden if len(parts) == 1 else jnp.concatenate([p[0].hidden for p in parts])
                parts = [(p[0]._replace(hidden=None),) + tuple(p[1:]) for p in parts]
            host = [parallel.to_host((p[0].tokens, p[0].mask)) for p in parts]
            g_tok = np.concatenate([h[0] for h in host])
            g_mask = np.concatenate([h[1] for h in host])
            rk = np.concatenate([np.asarray(p[1]) for p in parts])
            ptok, pmask = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
            row_signs = np.repeat(np.asarray(signs, np.float32), M) if ecfg.antithetic else None
        elif ecfg.wp_rank > 0:
            outs = [lowrank_generate(state["params"], mcfg, tr_tok, tr_mask, mkeys[c], sigma,
                                     jax.random.fold_in(kg, i), gkw, lr_fn, mesh=row_mesh(len(mkeys[c]) * M),
                                     signs=signs[c])
                    for i, c in enumerate(member_chunks(N, ecfg.gpu_threads))]
            host = [parallel.to_host((o.tokens, o.mask)) for o in outs]
            g_tok = np.concatenate([h[0] for h in host])
            g_mask = np.concatenate([h[1] for h in host])
        else:
            g_tok, g_mask = fullrank_generate(state["params"], mcfg, tr_tok, tr_mask, mkeys, kg, gkw, pfn,
                                              mesh=row_mesh(M), group=wp_group, signs=signs)
        g_tok, g_mask = np.asarray(g_tok), np.asarray(g_mask)
        t1 = time.perf_counter()
        phase_gc()
        per_row = row_rewards(tok, g_tok, g_mask, tr_gold, N)
        rewards = per_row.mean(axis=1)
        z = np.asarray(es_math.zscore(rewards))
        coefs = z * signs
        t2 = time.perf_counter()
        if method == "np":
            z_rows = (np.repeat(z, M) if ecfg.np_credit == "member"      # the replay applies the signs
                      else np.asarray(es_math.row_advantages(per_row)).reshape(-1))
            row_coef = np.asarray(z_rows / (N * sigma), np.float32)
            tokens, mask, contrib, start = np_replay_rows(ptok, pmask, g_tok, g_mask, ecfg.np_noise_prompt)
            rows_in = (tokens, mask, contrib, rk, row_coef, hidden, start, row_signs)
            rows_in = parallel.put_batch(rows_in, mesh) if row_mesh(len(tokens)) is not False else rows_in
            delta = replay(state["params"], *rows_in[:5], scales, *rows_in[5:])   # per-row sums all-reduced by XLA
            del hidden, rows_in
            acc = parallel.put({p: state["np_accum"][p] + delta[p] for p in upd_paths}, upd_sh)
            if (it + 1) % ecfg.np_sync_every == 0 or it + 1 == ecfg.n_iters:
                new_params, new_opt = opt_step(state["params"], acc, state.get("opt", {}))
                state = {**state, "params": new_params, "np_accum": zeros(), **({"opt": new_opt} if new_opt else {})}
            else:
                state = {**state, "np_accum": acc}
        else:
            new_params, new_opt = wp_step(state["params"], state.get("opt", {}), mkeys, jnp.asarray(coefs))
            state = {**state, "params": new_params, **({"opt": new_opt} if new_opt else {})}
        jax.block_until_ready(state["params"])
        t3 = time.perf_counter()
        phase_gc()
        done = it + 1
        if is_writer():
            _append_csv(rh_path, _REWARD_COLS, [
                {"iteration": it, "candidate_index": n, "seed": int(seeds[n]), "train_reward": repr(float(rewards[n]))}
                for n in range(N)])
        row = {"iteration": it, "reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
               "time_generate": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2}
        if not ecfg.skip_eval and (done % ecfg.eval_interval == 0 or done == ecfg.n_iters):
            row["eval_accuracy"] = evaluate(done)
            if is_writer():
                _append_csv(ev_path, ["iteration", "eval_accuracy"],
                            [{"iteration": done, "eval_accuracy": row["eval_accuracy"]}])
        history.append(row)
        say(f"iter {it}: reward mean {row['reward_mean']:.4f} max {row['reward_max']:.4f} | generate "
            f"{row['time_generate']:.2f}s reward {row['time_reward']:.2f}s update {row['time_update']:.2f}s"
            + (f" | eval {row['eval_accuracy']:.4f}" if "eval_accuracy" in row else ""))
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}")
        if done % ecfg.save_every == 0 or done == end:
            save(done)

    plot = None
    if is_writer() and not ecfg.skip_eval:
        plot = plot_eval(ev_path, os.path.join(out_dir, "eval_accuracy.png"),
                         f"ES-{method} {os.path.basename(ecfg.model_name)}")
    export_dir = None
    if ecfg.export_final and end == ecfg.n_iters:
        host_params = parallel.to_host(state["params"])  # every process: a gather across processes
        if is_writer():
            from jaxrl_sparse.models import export_hf
            export_dir = os.path.join(out_dir, "final_model")
            export_hf(export_dir, mcfg, host_params, tok)
    return {"out_dir": out_dir, "iterations_done": end, "history": history, "params": state["params"],
            "eval_plot": plot, "export_dir": export_dir, "method": method, "sigma": sigma}


def tree_flat(params):
    from jaxrl_sparse import tree as tree_lib
    return tree_lib.flatten(params)


def tree_select_paths(params, regexes) -> List[str]:
    from jaxrl_sparse import tree as tree_lib
    return list(tree_lib.select(params, list(regexes), what="NP parameters")) if regexes else []
