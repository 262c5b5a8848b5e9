"""Jitted KV-cache sampler: prefill + `lax.while_loop` decode, one compile per shape bucket.

    out = generate(params, cfg, prompt_tokens [B, P], prompt_mask [B, P], key, max_new_tokens=64)

Prompts are left-padded (mask 1 = real token). The prompt is padded further on the left to a
bucket length (power of two up to 64, then a multiple of 64) so that a stream of prompts of
varying lengths reuses a few compiled programs. The KV cache holds `P_bucket + N` slots and
lives in the loop carry; the loop stops as soon as every row has emitted EOS (or runs exactly N
steps with `fixed_length`). After a row emits EOS its later tokens are `pad_token_id`, masked.

Randomness: row b at step t draws with key `fold_in(fold_in(key, b), t)`, so a row's tokens
depend only on (key, b, its prompt), never on sharding or on other rows' lengths.

Data parallel: with a Mesh that has a 'data' axis (default: all devices when they divide B),
tokens, cache and noise keys are sharded over 'data'; params keep their sharding when it lives
on the mesh's devices and are replicated otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import (ActNoise, forward, fused_decode_applies, init_cache, join_projections,
                                         sharded_decode, split_cache, split_layers)
from jaxrl_sparse import parallel, sampling


class GenerateOutput(NamedTuple):
    tokens: jax.Array           # [B, N] int32 response tokens (pad after EOS)
    mask: jax.Array             # [B, N] bool, True for response tokens incl. the EOS token
    logprobs: jax.Array         # [B, N] f32 raw model log_softmax at the token (T=1, no filtering)
    sample_logprobs: jax.Array  # [B, N] f32 log-prob under the sampling distribution (0 if greedy)
    lengths: jax.Array          # [B] int32 = mask.sum(1)
    n_steps: jax.Array          # [] int32 decode steps run (< N when every row stopped early)
    # [B, P + N, D] compute dtype, only with capture_layer=j: the residual stream entering block j at
    # every prompt position and every fed response token (column P + i = response token i; the last
    # token, never fed, and tokens after a row stopped hold zeros / unused values). None otherwise.
    hidden: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static settings of one compiled sampler (hashable: part of the compile-cache key).

    EOS ids, pad id and min_new_tokens are runtime inputs of the compiled program (changing them
    does not recompile); they live here only for validation.
    """
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    fixed_length: bool = False
    layer_unroll: int = 1  # decode step: layers per scan iteration (>1 cuts GPU loop overhead)
    steps_per_sync: int = 1  # decode steps per while-loop iteration (the loop test syncs with the host)
    layer_loop: bool = False  # decode with one cache buffer per layer, layers unrolled (see split_cache)
    capture_layer: int = -1  # >= 0: also return the residual stream entering this block (GenerateOutput.hidden)
    prompt_copies: int = 1   # > 1: rows are this many copies (np.tile) of the first B / prompt_copies rows ...
    shared_layers: int = 0   # ... and blocks [0, shared_layers) are row-independent: prefilled once per prompt
    prefill_noise: bool = True  # False: the prompt's forward runs without the activation noise (decode steps only)
    min_new_tokens: int = dataclasses.field(default=0, compare=False)

    def validate(self) -> "SamplerSpec":
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"temperature={self.temperature} must be > 0 (use greedy for argmax decoding)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")
        if self.steps_per_sync < 1:
            raise UserError(f"steps_per_sync={self.steps_per_sync} must be >= 1")
        if self.layer_unroll < 1:
            raise UserError(f"layer_unroll={self.layer_unroll} must be >= 1")
        if self.prompt_copies < 1 or self.shared_layers < 0:
            raise UserError(f"prompt_copies={self.prompt_copies} must be >= 1 and shared_layers={self.shared_layers} >= 0")
        if self.capture_layer < -1:
            raise UserError(f"capture_layer={self.capture_layer} must be >= 0 (-1 = off)")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens]")
        return self


def bucket_length(p: int) -> int:
    """Prompt-length bucket: next power of two (min 8) up to 64, then the next multiple of 64."""
    if p <= 64:
        return max(8, 1 << max(0, int(p - 1).bit_length()))
    return -(-p // 64) * 64


def _eos_tuple(eos, cfg: ModelConfig) -> Tuple[int, ...]:
    eos = cfg.eos_token_id if eos is None else eos
    if eos is None:
        return ()
    if isinstance(eos, (int, np.integer)):
        return (int(eos),)
    return tuple(int(e) for e in eos)


def _eos_array(eos: Tuple[int, ...]) -> np.ndarray:
    """EOS ids padded with -1 to a multiple of 4 entries, so 0-4 ids share one compiled shape."""
    n = max(4, -(-len(eos) // 4) * 4)
    return np.asarray(tuple(eos) + (-1,) * (n - len(eos)), np.int32)


def cache_slots(prompt_len: int, max_new_tokens: int, steps_per_sync: int) -> int:
    """KV-cache slots of one decode: the (bucketed) prompt, the new tokens and steps_per_sync spare
    slots (the last loop iteration may overrun; masked). Decode attention is chosen on this size
    (`decoder.decode_attention_impl`)."""
    return prompt_len + max_new_tokens + steps_per_sync


def _per_layer(params) -> bool:
    """Decoder params whose 'layers' are already per layer (a tuple or `decoder.LayerSplit`)."""
    return isinstance(params, dict) and isinstance(params.get("layers"), (tuple, list))


def _decode_fn(cfg: ModelConfig, spec: SamplerSpec, params_fn: Optional[Callable], mesh: Optional[Mesh]):
    """The traced program: (params, tokens [B,P], mask [B,P], key, noise, stops) -> GenerateOutput.

    stops = (eos ids [E] int32 (-1 = unused), pad id [] int32, min_new_tokens [] int32).
    """
    N = spec.max_new_tokens
    kw = dict(greedy=spec.greedy, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p)
    cap = spec.capture_layer if spec.capture_layer >= 0 else None  # static: no capture, no extra ops

    rows = _row_axes(mesh)  # batch rows over every data-parallel axis of the mesh

    def shard(x, spec_):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_))

    def run(params, tokens, mask, key, noise, stops):
        eos, pad_id, min_new = stops
        is_eos = sampling.token_set(eos, cfg.vocab_size)  # [V]
        if params_fn is not None:
            params = params_fn(params)
        B, Pb = tokens.shape
        K = spec.steps_per_sync
        NB = N + K  # buffers/cache get K spare slots: the last iteration may overrun N (masked)
        cache = init_cache(cfg, B, cache_slots(Pb, N, K))
        kv = P(None, rows)
        cache = dict(cache, k=shard(cache["k"], kv), v=shard(cache["v"], kv),
                     mask=shard(cache["mask"], P(rows)))

        def per_layer(cache):  # one KV buffer per layer (see split_cache)
            cache = split_cache(cache)
            return dict(cache, k=tuple(shard(c, P("data")) for c in cache["k"]),
                        v=tuple(shard(c, P("data")) for c in cache["v"]))

        if _per_layer(params):  # per-layer weights (e.g. PPO's update carry):
            if not spec.layer_loop or (spec.prompt_copies > 1 and spec.shared_layers):  # prompt: layer by layer
                raise ValueError("per-layer weights need generate's layer_loop and no shared prefill")
            cache = per_layer(cache)
        out = _prefill(params, cfg, spec, tokens, mask, cache, noise, cap, shard, rows)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B, dtype=jnp.uint32))
        pos0 = jnp.sum(mask, axis=1, dtype=jnp.int32)  # position of the first new token

        def step_keys(t):
            return jax.vmap(jax.random.fold_in, (0, None))(row_keys, t.astype(jnp.uint32))

        t0 = jnp.zeros((), jnp.int32)
        tok, lp, slp = sampling.sample_tokens(out.logits[:, -1], step_keys(t0), ban=is_eos & (t0 < min_new), **kw)
        done = is_eos[tok]
        cache = out.cache
        if spec.layer_loop:  # per-layer weights and KV buffers for the decode loop (see split_cache)
            cache = per_layer(cache)
            layers = params["layers"]
            if isinstance(layers, dict) and fused_decode_applies(cfg, cache["k"][0].shape[2], noise):
                layers = join_projections(layers, qkv=True, gate_up=False)  # the fused step's q/k/v gemm
            params = dict(params, layers=split_layers(layers))
        buf_i = jnp.full((B, NB), pad_id, jnp.int32).at[:, 0].set(tok)
        buf_m = jnp.zeros((B, NB), jnp.bool_).at[:, 0].set(True)
        buf_lp = jnp.zeros((B, NB), jnp.float32).at[:, 0].set(lp)
        buf_slp = jnp.zeros((B, NB), jnp.float32).at[:, 0].set(slp)
        bufs = (buf_i, buf_m, buf_lp, buf_slp)
        if cap is not None:  # [B, Pb + NB, D]: prefill slots, then the token fed at step t at Pb + t - 1
            buf_h = jnp.zeros((B, Pb + NB, cfg.hidden_size), out.captured.dtype)
            bufs += (jax.lax.dynamic_update_slice_in_dim(buf_h, out.captured, 0, axis=1),)
        bufs = tuple(shard(b, P(rows)) for b in bufs)
        carry = (jnp.ones((), jnp.int32), tok, done, cache, bufs)

        def cond(c):
            t, _, done, _, _ = c
            return (t < N) & ~jnp.all(done)

        def step(c):
            t, prev, done, cache, (bi, bm, blp, bslp, *bh) = c
            alive = ~done & (t < N)
            o = forward(params, cfg, prev[:, None], alive[:, None], positions=(pos0 + t - 1)[:, None],
                        cache=cache, noise=noise, unroll=spec.layer_unroll, capture_layer=cap)
            tok, lp, slp = sampling.sample_tokens(o.logits[:, 0], step_keys(t), ban=is_eos & (t < min_new), **kw)
            tok = jnp.where(alive, tok, pad_id)
            upd = lambda b, v: jax.lax.dynamic_update_slice_in_dim(b, v[:, None].astype(b.dtype), t, axis=1)
            bufs = (upd(bi, tok), upd(bm, alive), upd(blp, jnp.where(alive, lp, 0.0)),
                    upd(bslp, jnp.where(alive, slp, 0.0)))
            if cap is not None:
                bufs += (jax.lax.dynamic_update_slice_in_dim(bh[0], o.captured.astype(bh[0].dtype), Pb + t - 1,
                                                             axis=1),)
            done = done | (alive & is_eos[tok])
            return t + 1, tok, done, o.cache, bufs

        def body(c):  # K decode steps per loop test: the test's device->host sync is paid once per K
            for _ in range(K):
                c = step(c)
            return c

        if spec.fixed_length:  # a counted loop: XLA knows its trip count, so the GPU runs it with no
            # device->host read of the condition per iteration (the while below pays one per test)
            t, _, _, _, bufs = jax.lax.fori_loop(0, -(-(N - 1) // K), lambda _, c: body(c), carry)
        else:
            t, _, _, _, bufs = jax.lax.while_loop(cond, body, carry)
        bi, bm, blp, bslp = (b[:, :N] for b in bufs[:4])
        hidden = bufs[4][:, :Pb + N] if cap is not None else None
        return GenerateOutput(bi, bm, blp, bslp, jnp.sum(bm, axis=1, dtype=jnp.int32), jnp.minimum(t, N),
                              hidden)

    def run_traced(*args):  # the Pallas decode kernel only where the rows stay on one device
        with sharded_decode(mesh is not None and mesh.size > 1):
            return run(*args)

    return run_traced


def _prefill(params, cfg: ModelConfig, spec: SamplerSpec, tokens, mask, cache, noise, cap, shard, rows):
    """The prompt's forward (logits of the last slot, filled cache, captured stream).

    With spec.prompt_copies = C > 1 and spec.shared_layers = j > 0 (the caller promises that rows are
    C `np.tile` copies of the first U = B / C rows and that blocks < j do not depend on the row,
    e.g. ES node perturbation of the last blocks only): blocks [0, j) run once on the U distinct
    prompts (replicated on every device), their cache and output stream are tiled to the B rows,
    and only blocks [j, L) run on all rows. Same values as the plain prefill in float32 (tested);
    in bf16 equal up to rounding (the plain scan adds the zero-scale noise through a float32 round
    trip that the shared blocks skip): on an H100 with random qwen2.5-1.5b weights 94% of the first
    greedy tokens agree (random weights make near-ties common).
    """
    C, j = spec.prompt_copies, spec.shared_layers
    if not spec.prefill_noise:
        noise = None
    if C == 1 or j == 0:
        return forward(params, cfg, tokens, mask, cache=cache, noise=noise, logits_last=1, capture_layer=cap)
    B = tokens.shape[0]
    U = B // C
    lt = cfg.layer_types[:j] if cfg.layer_types else cfg.layer_types
    pcfg = cfg.replace(num_layers=j, layer_types=lt)
    players = jax.tree_util.tree_map(lambda w: w[:j], params["layers"])
    ut, um = shard(tokens[:U], P()), shard(mask[:U], P())
    pcache = init_cache(pcfg, U, cache["mask"].shape[1], dtype=cache["k"].dtype)
    pre = forward(dict(params, layers=players), pcfg, ut, um, cache=pcache, compute_logits=False, capture_layer=j)
    tile = lambda x, axis: jnp.concatenate([x] * C, axis=axis)
    hidden = shard(tile(pre.captured, 0), P(rows))
    kv = P(None, rows)
    k = jax.lax.dynamic_update_slice_in_dim(cache["k"], shard(tile(pre.cache["k"], 1), kv), 0, axis=0)
    v = jax.lax.dynamic_update_slice_in_dim(cache["v"], shard(tile(pre.cache["v"], 1), kv), 0, axis=0)
    return forward(params, cfg, tokens, mask, cache=dict(cache, k=k, v=v), noise=noise, logits_last=1,
                   capture_layer=cap, start_layer=j, start_hidden=hidden)


@functools.lru_cache(maxsize=64)
def compiled_sampler(cfg: ModelConfig, spec: SamplerSpec, params_fn: Optional[Callable] = None,
                     mesh: Optional[Mesh] = None):
    """One `jax.jit` per static setting; jit's own cache then keys on shapes (the bucket)."""
    return jax.jit(_decode_fn(cfg, spec, params_fn, mesh))


def _row_axes(mesh: Optional[Mesh]) -> Tuple[str, ...]:
    """Mesh axes the batch rows are split over: ('data', 'fsdp') (see `jaxrl_sparse.parallel`);
    a 1-axis ('data',) mesh also works."""
    if mesh is None:
        return ()
    return tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names)


def _row_shards(mesh: Optional[Mesh]) -> int:
    """Devices the batch rows are split over (1 without a mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in _row_axes(mesh)]))


def _default_mesh(batch: int) -> Optional[Mesh]:
    n = jax.device_count()
    if n > 1 and batch % n == 0:
        return parallel.make_mesh("")
    return None


def _place(params, tokens, mask, noise, mesh: Mesh):
    """Batch arrays split over the mesh's data axes; params keep their sharding when it lives on the
    mesh's devices (e.g. fsdp-sharded by a trainer) and are replicated otherwise. Works across
    processes (each uploads its own shards of the identical host batch)."""
    devs = set(mesh.devices.flat)
    rep, row = NamedSharding(mesh, P()), NamedSharding(mesh, P(_row_axes(mesh)))

    def put_param(x):
        if isinstance(x, jax.Array) and set(x.sharding.device_set) == devs:
            return x
        return parallel.put(x, rep)

    params = jax.tree_util.tree_map(put_param, params)
    tokens, mask = parallel.put(tokens, row), parallel.put(mask, row)
    if noise is not None:
        noise = noise.replace(keys=parallel.put(noise.keys, row), attn_scale=parallel.put(noise.attn_scale, rep),
                              mlp_scale=parallel.put(noise.mlp_scale, rep), head_scale=parallel.put(noise.head_scale, rep),
                              start=None if noise.start is None else parallel.put(noise.start, row),
                              sign=None if noise.sign is None else parallel.put(noise.sign, row))
    return params, tokens, mask, noise


def check_prompts(prompt_mask: np.ndarray, cfg: ModelConfig, max_new_tokens: int) -> None:
    """Host-side checks: every row has a real token, padding is on the left, positions fit."""
    m = np.asarray(prompt_mask).astype(bool)
    if m.ndim != 2:
        raise UserError(f"prompt_mask must be [batch, length], got shape {m.shape}")
    if not m.any(axis=1).all():
        raise UserError("a prompt has no tokens; give every row at least one token (e.g. BOS)")
    if (np.diff(m.astype(np.int8), axis=1) < 0).any():
        raise UserError("prompts must be left-padded (mask 0...0 1...1 per row)")
    longest = int(m.sum(axis=1).max()) + max_new_tokens
    if cfg.positional == "learned" and longest > cfg.max_position_embeddings:
        raise UserError(f"prompt + max_new_tokens = {longest} exceeds the model's "
                        f"{cfg.max_position_embeddings} positions; shorten the prompt or max_new_tokens")


def prompt_copies(prompt_tokens, prompt_mask) -> int:
    """Largest C such that the rows are C `np.tile` copies of the first B / C rows (1: none)."""
    t, m = np.asarray(prompt_tokens), np.asarray(prompt_mask).astype(bool)
    B = t.shape[0]
    for u in range(1, B):
        if B % u or not np.array_equal(t[u], t[0]):
            continue
        if np.array_equal(t[u:], t[:-u]) and np.array_equal(m[u:], m[:-u]):
            return B // u
    return 1


def _share_prefill(spec: SamplerSpec, cfg: ModelConfig, prompt_tokens, prompt_mask, noise, mesh,
                   shared_layers: int) -> SamplerSpec:
    """spec with prompt_copies / shared_layers set when a shared prefill saves work (see `_prefill`):
    the prompts repeat, fewer distinct prompts than rows per device, and blocks [0, j) carry no
    noise (j is lowered to the first noisy block when the noise's active sites are known and the
    prompt runs with noise)."""
    j = min(int(shared_layers), cfg.num_layers - 1)
    if noise is not None and spec.prefill_noise:
        first = noise.first_noisy_layer(cfg.num_layers)
        j = 0 if first is None else min(j, first)
    if spec.capture_layer >= 0:   # the captured stream comes from the per-row blocks
        j = min(j, spec.capture_layer)
    if j <= 0:
        return spec
    c = prompt_copies(prompt_tokens, prompt_mask)
    if c <= _row_shards(mesh):  # each device would prefill at least as many distinct prompts as its own rows
        return spec
    return dataclasses.replace(spec, prompt_copies=c, shared_layers=j)


def prepare(params, cfg: ModelConfig, prompt_tokens, prompt_mask, key, *, max_new_tokens: int,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
            min_new_tokens: int = 0, eos_token_id: Union[int, Sequence[int], None] = None,
            pad_token_id: Optional[int] = None, fixed_length: bool = False,
            noise: Optional[ActNoise] = None, mesh: Union[Mesh, None, bool] = None, bucket: bool = True,
            layer_unroll: Optional[int] = None, steps_per_sync: int = 1,
            layer_loop: Optional[bool] = None, capture_layer: int = -1, prefill_shared_layers: int = 0,
            noise_in_prompt: bool = True):
    """`generate`'s host-side preparation (settings as in `generate`): validated SamplerSpec, the
    defaults (pad id, layer loop), prompt bucketing, mesh choice and placement, key, stop inputs.

    Returns (spec, mesh or None, (params, tokens [B, Pb], mask [B, Pb], key, noise, stops)): the
    arguments of `compiled_sampler(cfg, spec, params_fn, mesh)` / the traced `_decode_fn` program
    (callers that wrap that program, e.g. a vmap over ES population members, use this too).
    """
    eos = _eos_tuple(eos_token_id, cfg)
    on_cpu = jax.devices()[0].platform == "cpu"
    if layer_loop is None:  # per-layer weights (e.g. PPO's update carry) run layer by layer anyway
        layer_loop = not on_cpu or _per_layer(params)
    if layer_loop:  # the scan's unroll has no effect there: keep it out of the compile-cache key
        layer_unroll = 1
    elif layer_unroll is None:
        layer_unroll = 1 if on_cpu else cfg.num_layers
    pad = pad_token_id if pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    spec = SamplerSpec(int(max_new_tokens), float(temperature), int(top_k), float(top_p), bool(greedy),
                       bool(fixed_length), int(layer_unroll), int(steps_per_sync), bool(layer_loop),
                       int(capture_layer), prefill_noise=bool(noise_in_prompt) or noise is None,
                       min_new_tokens=int(min_new_tokens)).validate()
    if spec.capture_layer >= cfg.num_layers:
        raise UserError(f"capture_layer={capture_layer} must be < the model's {cfg.num_layers} layers")
    check_prompts(prompt_mask, cfg, spec.max_new_tokens)
    # host prompts stay numpy until the program's call (or `_place`) uploads them: an eager jnp op
    # per array costs ~0.1-0.3 ms of host time on an H100 machine, with the device idle meanwhile
    xp = jnp if isinstance(prompt_tokens, jax.Array) or isinstance(prompt_mask, jax.Array) else np
    tokens = xp.asarray(prompt_tokens).astype(np.int32)
    mask = xp.asarray(prompt_mask).astype(np.bool_)
    B, P0 = tokens.shape
    Pb = bucket_length(P0) if bucket else P0
    if Pb > P0:
        tokens = xp.pad(tokens, ((0, 0), (Pb - P0, 0)), constant_values=int(pad))
        mask = xp.pad(mask, ((0, 0), (Pb - P0, 0)))
    if mesh is None:
        mesh = _default_mesh(B)
    elif mesh is False:
        mesh = None
    if mesh is not None:
        n = _row_shards(mesh)
        if B % n:
            raise UserError(f"batch {B} is not divisible by the mesh's data axes ({n} devices)")
    spec = _share_prefill(spec, cfg, prompt_tokens, prompt_mask, noise, mesh, prefill_shared_layers)
    if mesh is not None:
        params, tokens, mask, noise = _place(params, tokens, mask, noise, mesh)
    if not isinstance(key, jax.Array) or not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    if greedy:  # temperature/top-k/top-p do not change argmax decoding: share one compile
        spec = dataclasses.replace(spec, temperature=1.0, top_k=0, top_p=1.0)
    stops = (_eos_array(eos), np.int32(pad), np.int32(spec.min_new_tokens))
    return spec, mesh, (params, tokens, mask, key, noise, stops)


def generate(params, cfg: ModelConfig, prompt_tokens, prompt_mask, key, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             min_new_tokens: int = 0, eos_token_id: Union[int, Sequence[int], None] = None,
             pad_token_id: Optional[int] = None, fixed_length: bool = False,
             noise: Optional[ActNoise] = None, params_fn: Optional[Callable[[Any], Any]] = None,
             mesh: Union[Mesh, None, bool] = None, bucket: bool = True,
             layer_unroll: Optional[int] = None, steps_per_sync: int = 1,
             layer_loop: Optional[bool] = None, capture_layer: int = -1,
             prefill_shared_layers: int = 0, noise_in_prompt: bool = True) -> GenerateOutput:
    """Samples up to `max_new_tokens` tokens after left-padded prompts [B, P].

    key: a PRNG key (typed or raw uint32[2]). eos_token_id: int or list (default cfg's; none = no
    stopping). pad_token_id: filler after EOS (default cfg's pad, else the first EOS, else 0).
    noise: ActNoise (keys [B, 2]) passed to every forward (positions are absolute, so a teacher-
    forced replay sees the same eps). params_fn: applied to params inside the jit (e.g. a LoRA
    merge); hashed as a static argument, so pass the same function object to reuse the compile.
    mesh: a Mesh with a 'data' (and 'fsdp') axis, rows split over both (`jaxrl_sparse.parallel`);
    None = all devices when they divide B; False = no sharding.
    bucket: pad the prompt length up to `bucket_length(P)` (fewer compiles).
    layer_loop: decode with per-layer weights and KV buffers, layers unrolled (`split_cache`; same
    tokens): no per-step copies of each layer's weights and cache slice. Default: on for
    accelerators, off on CPU (faster compiles); always on when params['layers'] is already per
    layer (a tuple or `decoder.LayerSplit`, e.g. PPO's update carry, q/k/v may be joined): the
    prompt then runs layer by layer too, and nothing is copied. layer_unroll: without layer_loop, layers per
    iteration of the decode step's layer scan (identical results; default 1 on CPU, all layers
    elsewhere); ignored with layer_loop, which unrolls every layer.
    capture_layer: j >= 0 also returns `hidden` [B, P + N, D] (compute dtype; P = the caller's prompt
    length, bucket padding stripped), the residual stream entering block j for every prompt slot and
    fed response token, aligned with `concat([prompt_tokens, out.tokens], 1)`: a replay of blocks
    j..L-1 can start from it (`forward(..., start_layer=j, start_hidden=...)`). Costs B (P + N) D
    values of memory; -1 (default) = off, the program is unchanged.
    prefill_shared_layers: j > 0 promises that blocks [0, j) compute the same thing for equal prompts
    (no row-dependent perturbation there: ES node perturbation of the last blocks; never with a
    row-dependent params interceptor such as low-rank WP). When the rows are `np.tile` copies of
    fewer distinct prompts (an ES population), those blocks are prefilled once per distinct prompt
    and the result tiled (`_prefill`); j is lowered to the noise's first perturbed block.
    noise_in_prompt: False runs the prompt's forward without `noise` (it then perturbs decode steps
    only: positions >= the row's prompt length; a replay uses `ActNoise(start=prompt lengths)`).
    """
    spec, mesh, (params, tokens, mask, key, noise, stops) = prepare(
        params, cfg, prompt_tokens, prompt_mask, key, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, greedy=greedy, min_new_tokens=min_new_tokens, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, fixed_length=fixed_length, noise=noise, mesh=mesh, bucket=bucket,
        layer_unroll=layer_unroll, steps_per_sync=steps_per_sync, layer_loop=layer_loop,
        capture_layer=capture_layer, prefill_shared_layers=prefill_shared_layers, noise_in_prompt=noise_in_prompt)
    P0, Pb = np.shape(prompt_tokens)[1], tokens.shape[1]
    fn = compiled_sampler(cfg, spec, params_fn, mesh)
    out = fn(params, tokens, mask, key, noise, stops)
    if out.hidden is not None and Pb > P0:  # drop the bucket's extra left padding: align with the caller's prompt
        out = out._replace(hidden=out.hidden[:, Pb - P0:])
    return out
