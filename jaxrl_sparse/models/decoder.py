"""One Flax Linen decoder for GPT-2, Llama, Qwen2, Gemma 2 and Gemma 3 (text).

Blocks are stacked on a leading layer axis and run with `nn.scan`, so compile time does not grow
with depth. The KV cache lives in the scan carry and is updated in place with
`dynamic_update_slice`. For GPU decoding, `forward` also takes per-layer weights and cache buffers
(`split_layers`, `split_cache`) and then applies the same `Block` layer by layer, unrolled: a
decode step then reads each buffer in place instead of copying a layer's slice out of the stack.
`forward(capture_layer=j)` also returns the residual stream entering block j, and
`forward(start_layer=j, start_hidden=...)` runs only blocks j..L-1 from such a stream (the ES NP
replay of the last K blocks); both split the layer scan (or loop) at j.

Conventions
- `tokens [B, T]` int32, `attention_mask [B, T]` (1 = real token, 0 = padding; left padding works).
- Positions default to `cumsum(mask) - 1` counted from the tokens already in the cache, so a
  left-padded row starts at position 0 at its first real token.
- Attention works in "slot" space: slot = index in the cache (or in `tokens` without a cache).
  Key slot s is visible to query slot q iff s <= q, the key is a real token, and for sliding
  layers q - s < window. Left padding keeps slot distance == position distance for real tokens.
- Activation noise (ES node perturbation) is keyed per batch row; see `act_noise_value`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from typing import Any, Dict, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.kernels import add_norm as add_norm_kernel
from jaxrl_sparse.kernels import decode_attention as decode_kernel
from jaxrl_sparse.kernels import train_attention as train_kernel
from jaxrl_sparse.models.config import ModelConfig

NOISE_SITES = {"attn": 0, "mlp": 1, "head": 2}


@jax.tree_util.register_pytree_node_class
class ActNoise:
    """Node-perturbation noise: output of site s in layer l of row b gets `scale_s[l] * eps`.

    keys: [B, 2] uint32 raw PRNG key data, one stream per batch row (population member).
    attn_scale, mlp_scale: [L] float (0 = not perturbed). head_scale: [] float.
    eps = act_noise_value(keys[b], site, layer, position, dim), regenerable for replay.

    active: static frozenset of the (site, layer) pairs with a nonzero scale ('head' uses layer 0),
    or None = unknown (noise is drawn at every site and multiplied by its scale). It is found from
    the scales when they are concrete (built outside `jit`, as the ES trainer does), so the layer-
    by-layer decode skips drawing noise where the scale is 0 (exactly the same output: 0 * eps = 0).
    It is pytree aux data: part of a jit's cache key, not a traced value.

    start: None (noise at every position) or [B] int: row b gets noise only at positions >= start[b]
    (the ES replay of generation whose prompt ran without noise: start = the prompt's length).
    sign: None or [B] float: row b's noise is multiplied by sign[b] (antithetic ES pairs share a
    key with signs +1 / -1).
    """
    __slots__ = ("keys", "attn_scale", "mlp_scale", "head_scale", "start", "sign", "active")
    _AUTO = object()

    def __init__(self, keys, attn_scale, mlp_scale, head_scale, start=None, sign=None, active=_AUTO):
        self.keys, self.attn_scale, self.mlp_scale, self.head_scale = keys, attn_scale, mlp_scale, head_scale
        self.start, self.sign = start, sign
        self.active = active_sites(attn_scale, mlp_scale, head_scale) if active is ActNoise._AUTO else active

    def tree_flatten(self):
        return (self.keys, self.attn_scale, self.mlp_scale, self.head_scale, self.start, self.sign), self.active

    @classmethod
    def tree_unflatten(cls, active, children):
        return cls(*children, active=active)

    def replace(self, **kw) -> "ActNoise":
        d = {k: getattr(self, k) for k in self.__slots__}
        d.update(kw)
        return ActNoise(**d)

    def is_active(self, site: str, layer) -> bool:
        """False only when this (site, layer) is statically known to have scale 0."""
        if self.active is None or not isinstance(layer, int):
            return True
        return (site, layer) in self.active

    def first_noisy_layer(self, num_layers: int) -> Optional[int]:
        """Lowest block with attn/mlp noise (num_layers when only the head, or nothing, is noisy);
        None when the active sites are unknown."""
        if self.active is None:
            return None
        return min([l for s, l in self.active if s != "head"], default=num_layers)


def active_sites(attn_scale, mlp_scale, head_scale):
    """frozenset of (site, layer) with a nonzero scale, or None when a scale is traced (inside jit)."""
    if any(isinstance(x, jax.core.Tracer) for x in (attn_scale, mlp_scale, head_scale)):
        return None
    out = {(site, int(l)) for site, sc in (("attn", attn_scale), ("mlp", mlp_scale))
           for l in np.flatnonzero(np.asarray(sc))}
    if np.asarray(head_scale).any():
        out.add(("head", 0))
    return frozenset(out)


def act_noise_value(key_data, site: int, layer, positions, dim: int, dtype=jnp.float32):
    """eps [T, dim] ~ N(0, 1) for one row: key = fold_in(fold_in(fold_in(row_key, site), layer), pos)."""
    key = jax.random.wrap_key_data(key_data)
    key = jax.random.fold_in(jax.random.fold_in(key, site), layer)
    keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(positions)
    return jax.vmap(lambda k: jax.random.normal(k, (dim,), dtype))(keys)


def noise_eps(noise: ActNoise, site: str, layer, positions, dim: int):
    """Row b's unscaled noise [B, T, dim] float32 at `site`: act_noise_value of its key, zero before
    noise.start[b], times noise.sign[b]. The one definition generation and the ES replay share."""
    eps = jax.vmap(lambda kd, pos: act_noise_value(kd, NOISE_SITES[site], layer, pos, dim))(noise.keys, positions)
    if noise.start is not None:
        eps = eps * (positions >= noise.start[:, None])[..., None]
    if noise.sign is not None:
        eps = eps * noise.sign.astype(jnp.float32)[:, None, None]
    return eps


def _add_noise(noise: Optional[ActNoise], site: str, layer, scale, y, positions):
    """y [B, T, dim] + scale * eps (no-op when noise is None or the site is statically inactive)."""
    if noise is None or not noise.is_active(site, layer):
        return y
    return (y.astype(jnp.float32) + scale * noise_eps(noise, site, layer, positions, y.shape[-1])).astype(y.dtype)


def _dt(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


class RMSNorm(nn.Module):
    eps: float
    unit_offset: bool  # Gemma stores w and scales by (1 + w)
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + scale if self.unit_offset else scale)).astype(x.dtype)


def make_norm(cfg: ModelConfig, name: str):
    if cfg.norm_type == "layernorm":
        return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=_dt(cfg.param_dtype),
                            name=name)
    return RMSNorm(cfg.norm_eps, cfg.is_gemma, _dt(cfg.param_dtype), name=name)


def _dense(cfg: ModelConfig, features: int, name: Optional[str], bias: bool):
    return nn.Dense(features, use_bias=bias, dtype=_dt(cfg.dtype), param_dtype=_dt(cfg.param_dtype),
                    kernel_init=nn.initializers.normal(0.02), name=name)


def rope_tables(positions, head_dim: int, theta: float, factor: float = 1.0):
    """cos, sin [B, T, hd/2] for rotate-half RoPE (HF Llama convention)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = (positions.astype(jnp.float32) / factor)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """x [B, T, N, hd]; rotate-half convention."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _act(cfg: ModelConfig, x):
    if cfg.activation == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=True)


# 'auto' (default) | 'xla' | 'cudnn' | 'pallas': how single-token (decode) attention runs. 'cudnn' is
# one fused cuDNN kernel (`jax.nn.dot_product_attention`); 'pallas' is `kernels.decode_attention`
# (attention and the KV-cache write as one kernel that reads only the filled slots; per-layer caches
# only, i.e. the GPU layer loop). 'auto' uses, on CUDA GPUs (compute capability >= 8), cuDNN for
# caches of at least CUDNN_MIN_SLOTS slots, where it measured faster than XLA (BENCHMARKS.md: +2-10%
# at 324-388 slots, -14% at 44 slots on an H100), the Pallas kernel below that, and the XLA path
# everywhere else (CPUs included, sharded decodes, vmapped ones).
ATTENTION_IMPL = os.environ.get("JAXRL_ATTENTION", "auto")
CUDNN_MIN_SLOTS = 256
_XLA_ONLY = contextvars.ContextVar("jaxrl_xla_attention_only", default=False)
_SHARDED = contextvars.ContextVar("jaxrl_sharded_decode", default=False)


@contextlib.contextmanager
def xla_attention():
    """Attention traced inside this block takes the XLA path whatever ATTENTION_IMPL says.

    For programs vmapped over a decode (full-rank ES groups): JAX 0.11.2's batching rule of the
    cuDNN attention fails on a mask ("cannot reshape array of shape (2, 8, 1, 1, 300)")."""
    token = _XLA_ONLY.set(True)
    try:
        yield
    finally:
        _XLA_ONLY.reset(token)


_TRAIN_KERNELS = contextvars.ContextVar("jaxrl_train_attention_kernels", default=False)


@contextlib.contextmanager
def training_attention_kernels(on: bool = True):
    """Layer-loop forwards over a fresh per-layer cache (training steps) traced inside this block
    (on=True) run attention through `kernels.train_attention` on CUDA GPUs (a forward kernel and two
    backward kernels) where it applies; callers turn it on for one-device programs only."""
    token = _TRAIN_KERNELS.set(bool(on))
    try:
        yield
    finally:
        _TRAIN_KERNELS.reset(token)


def training_attention_impl(cfg: ModelConfig, T: int) -> str:
    """'pallas' or 'xla' for a T-token forward over a fresh per-layer cache (see
    `training_attention_kernels`; JAXRL_ATTENTION=xla turns the kernels off)."""
    ok = (_TRAIN_KERNELS.get() and not _XLA_ONLY.get() and ATTENTION_IMPL != "xla" and not cfg.attn_logit_softcap
          and cfg.num_heads % cfg.num_kv_heads == 0 and train_kernel.supported(T, cfg.head_dim))
    return "pallas" if ok else "xla"


@contextlib.contextmanager
def sharded_decode(on: bool = True):
    """Decodes traced inside this block (on=True) have their rows split over several devices: no
    Pallas kernel (XLA cannot partition its custom call; it would gather the batch)."""
    token = _SHARDED.set(bool(on))
    try:
        yield
    finally:
        _SHARDED.reset(token)


def _cuda_capable() -> bool:
    d = jax.devices()[0]
    cc = getattr(d, "compute_capability", None)  # CUDA devices only, e.g. '9.0'
    try:
        return d.platform == "gpu" and cc is not None and float(cc) >= 8.0
    except (TypeError, ValueError):
        return False


def decode_attention_impl(cfg: ModelConfig, T: int, slots: int, layer_cache: bool = False) -> str:
    """'cudnn', 'pallas' or 'xla' for a query of T tokens over a cache of `slots` slots (see
    ATTENTION_IMPL); layer_cache: the cache is one layer's own buffer (the layer loop)."""
    if ATTENTION_IMPL not in ("auto", "xla", "cudnn", "pallas"):
        from jaxrl_sparse.errors import UserError
        raise UserError(f"JAXRL_ATTENTION={ATTENTION_IMPL!r}: choose auto, xla, cudnn or pallas (or leave it unset)")
    if T != 1 or cfg.attn_logit_softcap or ATTENTION_IMPL == "xla" or _XLA_ONLY.get():
        return "xla"
    pallas_ok = (layer_cache and not _SHARDED.get() and cfg.num_heads % cfg.num_kv_heads == 0
                 and decode_kernel.supported(cfg.head_dim, slots))
    if ATTENTION_IMPL in ("cudnn", "pallas"):
        return "xla" if ATTENTION_IMPL == "pallas" and not pallas_ok else ATTENTION_IMPL
    if not _cuda_capable():
        return "xla"
    if slots >= CUDNN_MIN_SLOTS and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128:
        return "cudnn"
    return "pallas" if pallas_ok else "xla"


# 'auto' (default) | 'off': whether layer-loop decode steps of GPT-2 models run `_fused_decode_forward`
# where it applies (`fused_decode_applies`); 'off' runs the Block as everywhere else (A/B runs).
FUSED_DECODE = os.environ.get("JAXRL_FUSED_DECODE", "auto")


def _interceptors_active() -> bool:
    """Whether a Flax method interceptor (`nn.intercept_methods`: LoRA, ES low-rank perturbation,
    weight-gradient captures) is installed while tracing: the fused decode step bypasses nn.Dense."""
    try:
        from flax.linen import module as flax_module
        return len(flax_module._global_interceptor_stack) > 0
    except (ImportError, AttributeError, TypeError):  # unknown Flax internals: assume one is
        return True


def fused_decode_applies(cfg: ModelConfig, slots: int, noise=None) -> bool:
    """Whether a single-token step over per-layer caches of `slots` slots runs `_fused_decode_forward`:
    GPT-2 blocks (LayerNorm, biases, learned positions), a power-of-two width, the Pallas decode
    attention (`decode_attention_impl`: CUDA, unsharded), no activation noise and no interceptor.
    The sampler joins the q/k/v projections when this holds (the step needs them joined)."""
    if FUSED_DECODE not in ("auto", "off"):
        from jaxrl_sparse.errors import UserError
        raise UserError(f"JAXRL_FUSED_DECODE={FUSED_DECODE!r}: choose auto or off (or leave it unset)")
    if FUSED_DECODE == "off" or noise is not None or not cfg.is_gpt2 or cfg.final_logit_softcap:
        return False
    if not add_norm_kernel.supported(cfg.hidden_size) or _interceptors_active():
        return False
    return decode_attention_impl(cfg, 1, slots, layer_cache=True) == "pallas"


def attention(cfg: ModelConfig, q, keys, vals, mask):
    """Grouped-query attention: q [B, T, H, hd], keys/vals [B, K, S, hd], mask [B, T, S] -> [B, T, H, hd].

    keys/vals come head-major, as the KV cache stores them: the batched q·kᵀ and p·v gemms (batch
    dims b, k) then read the cache as it lies, where a slot-major cache [B, S, K, hd] made XLA
    transpose every layer's whole cache at every decode step.

    softmax(q·kᵀ · attn_scale [softcapped], masked) · v with fp32 scores. Decode steps (T == 1: every
    query row sees at least one key) of models without an attention softcap may instead call
    `jax.nn.dot_product_attention(implementation='cudnn')`, one fused kernel (`decode_attention_impl`).
    """
    B, T, H, hd = q.shape
    K = keys.shape[1]
    if decode_attention_impl(cfg, T, keys.shape[2]) == "cudnn":
        keys, vals = keys.transpose(0, 2, 1, 3), vals.transpose(0, 2, 1, 3)   # cuDNN takes [B, S, K, hd]
        return jax.nn.dot_product_attention(q, keys.astype(q.dtype), vals.astype(q.dtype),
                                            mask=mask[:, None], scale=cfg.attn_scale, implementation="cudnn")
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * cfg.attn_scale
    if cfg.attn_logit_softcap:
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(vals.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, vals).reshape(B, T, H, hd)


def _bthd_attention(cfg: ModelConfig, q, k, v, mask):
    """`attention` with k, v in the projections' [B, T, K, hd] layout: the XLA form of
    `kernels.train_attention`."""
    return attention(cfg, q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def _cache_write_attention(cfg: ModelConfig, q, k, v, k_cache, v_cache, mask, idx):
    """One layer's cache buffers [B, K, S, hd] get k, v [B, K, T, hd] at slot idx; then `attention`.
    Returns (o [B, T, H, hd], k_cache, v_cache): the XLA form of `kernels.decode_attention`."""
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, idx, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, idx, 0))
    return attention(cfg, q, k_cache, v_cache, mask), k_cache, v_cache


class Block(nn.Module):
    """One transformer block; scanned over layers. Carry: (x, k_cache, v_cache)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, ctx):
        cfg = self.cfg
        x, k_cache, v_cache = carry
        B, T, D = x.shape
        H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        # ---- attention
        h = make_norm(cfg, "input_norm")(x)
        attn = AttnParams(cfg, name="attn")
        q, k, v = attn.qkv(h)  # [B, T, H|K, hd]
        is_sliding = ctx["sliding"][layer]
        if cfg.positional == "rope":
            cos = jnp.where(is_sliding, ctx["cos_local"], ctx["cos"])
            sin = jnp.where(is_sliding, ctx["sin_local"], ctx["sin"])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        idx = ctx["cache_index"]
        k_t, v_t = k, v  # [B, T, K, hd]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, hd]: the cache's head-major layout
        mask = jnp.where(is_sliding, ctx["mask_local"], ctx["mask"])  # [B, T, S]
        fresh = k_cache.ndim == 4 and k_cache.shape[2] == T  # a training forward's own per-layer cache
        if fresh and training_attention_impl(cfg, T) == "pallas":
            o = train_kernel.attention(q, k_t, v_t, mask, scale=cfg.attn_scale,
                                       fallback=functools.partial(_bthd_attention, cfg))
            k_cache, v_cache = k.astype(k_cache.dtype), v.astype(v_cache.dtype)  # the cache, all T slots filled
        elif k_cache.ndim == 4:  # this layer's own cache buffer [B, K, S, hd] (layer-loop decoding)
            if decode_attention_impl(cfg, T, k_cache.shape[2], layer_cache=True) == "pallas":
                o, k_cache, v_cache = decode_kernel.decode_attention(
                    q, k, v, k_cache, v_cache, mask, idx, scale=cfg.attn_scale,
                    fallback=functools.partial(_cache_write_attention, cfg))
            else:
                o, k_cache, v_cache = _cache_write_attention(cfg, q, k, v, k_cache, v_cache, mask, idx)
        else:  # stacked [L, B, K, S, hd] in the scan carry (or [L - j, ...] from block j: cache_layer0)
            cl = layer - ctx["cache_layer0"] if "cache_layer0" in ctx else layer
            k_cache = jax.lax.dynamic_update_slice(
                k_cache, k.astype(k_cache.dtype)[None], (cl, 0, 0, idx, 0))
            v_cache = jax.lax.dynamic_update_slice(
                v_cache, v.astype(v_cache.dtype)[None], (cl, 0, 0, idx, 0))
            o = attention(cfg, q, k_cache[cl], v_cache[cl], mask)  # cache [B, K, S, hd]
        o = o.reshape(B, T, H * hd).astype(x.dtype)
        o = attn.out(o)
        o = _add_noise(ctx["noise"], "attn", layer,
                       None if ctx["noise"] is None else ctx["noise"].attn_scale[layer], o, ctx["positions"])
        if cfg.post_norms:
            o = make_norm(cfg, "post_attn_norm")(o)
        x = x + o

        # ---- MLP
        h = make_norm(cfg, "pre_mlp_norm")(x)
        m = Mlp(cfg, name="mlp")(h)
        m = _add_noise(ctx["noise"], "mlp", layer,
                       None if ctx["noise"] is None else ctx["noise"].mlp_scale[layer], m, ctx["positions"])
        if cfg.post_norms:
            m = make_norm(cfg, "post_mlp_norm")(m)
        x = x + m
        return (x, k_cache, v_cache), None


class AttnParams(nn.Module):
    """Holds q/k/v/o projections (and Gemma 3 q/k norms); the attention math lives in Block."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _dense(cfg, H * hd, None, cfg.qkv_bias)
        self.k_proj = _dense(cfg, K * hd, None, cfg.qkv_bias)
        self.v_proj = _dense(cfg, K * hd, None, cfg.qkv_bias)
        self.qkv_proj = _dense(cfg, (H + 2 * K) * hd, None, cfg.qkv_bias)  # only with `join_projections` params
        self.o_proj = _dense(cfg, cfg.hidden_size, None, cfg.is_gpt2)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.norm_eps, True, _dt(cfg.param_dtype))
            self.k_norm = RMSNorm(cfg.norm_eps, True, _dt(cfg.param_dtype))

    def qkv(self, h):
        cfg = self.cfg
        B, T, _ = h.shape
        H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.has_variable("params", "qkv_proj"):  # joined projections (`join_projections`): one gemm
            q, k, v = jnp.split(self.qkv_proj(h), [H * hd, (H + K) * hd], axis=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, K, hd), v.reshape(B, T, K, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def out(self, o):
        return self.o_proj(o)

    def __call__(self, h):  # used only so `init` creates every parameter
        q, k, v = self.qkv(h)
        return self.out(q.reshape(*h.shape[:2], -1))


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.cfg
        if cfg.gated_mlp:
            if self.has_variable("params", "gate_up_proj"):  # joined (`join_projections`): one gemm
                I = cfg.intermediate_size
                g, u = jnp.split(_dense(cfg, 2 * I, "gate_up_proj", False)(h), [I], axis=-1)
            else:
                g = _dense(cfg, cfg.intermediate_size, "gate_proj", False)(h)
                u = _dense(cfg, cfg.intermediate_size, "up_proj", False)(h)
            return _dense(cfg, cfg.hidden_size, "down_proj", False)(_act(cfg, g) * u)
        u = _dense(cfg, cfg.intermediate_size, "up_proj", True)(h)
        return _dense(cfg, cfg.hidden_size, "down_proj", True)(_act(cfg, u))


class DecoderOutput(NamedTuple):
    logits: Optional[jax.Array]   # [B, T, V] float32 (None when compute_logits=False)
    hidden: jax.Array             # [B, T, D] final-normed hidden states
    cache: Optional[Dict[str, jax.Array]]
    captured: Optional[jax.Array] = None  # [B, T, D] residual stream entering block `capture_layer`


class _Blocks(nn.Module):
    """Blocks [a, a + length) as one `nn.scan` named 'layers', so parameter and module paths are the
    Decoder's (`layers/mlp/down_proj`, ...): interceptors keyed on them work unchanged.
    Params {'layers': stacked [length, ...]}; `layer_ids` [length] are absolute layer indices."""
    cfg: ModelConfig
    length: int
    remat: bool = False
    unroll: int = 1

    @nn.compact
    def __call__(self, carry, layer_ids, ctx):
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        Stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast), length=self.length,
                        unroll=max(1, min(self.unroll, self.length)))
        return Stack(self.cfg, name="layers")(carry, layer_ids, ctx)[0]


class _UntiedHead(nn.Module):
    """The untied head as a Dense named 'lm_head' (the Decoder's module path), for the functional paths."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        return _dense(self.cfg, self.cfg.vocab_size, "lm_head", False)(x)


class _OneBlock(nn.Module):
    """One block under the name 'layers' (per-layer path): module paths match the scanned Decoder's."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, ctx):
        return Block(self.cfg, name="layers")(carry, layer, ctx)[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None,
               layers: Optional[int] = None) -> Dict[str, jax.Array]:
    """Empty KV cache: k, v [L, B, K, S, hd] (head-major, see `attention`); mask [B, S] (slot holds a
    real token); index [].

    layers: cache only the last `layers` blocks (a forward that starts at block L - layers).
    """
    dtype = dtype or _dt(cfg.dtype)
    shape = (cfg.num_layers if layers is None else layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, max_len), jnp.bool_), "index": jnp.zeros((), jnp.int32)}


def _attention_masks(cfg: ModelConfig, kv_mask, cache_index, T: int):
    """[B, T, S] visibility for global and sliding layers (slot space)."""
    S = kv_mask.shape[1]
    q_slot = cache_index + jnp.arange(T)[:, None]
    k_slot = jnp.arange(S)[None, :]
    causal = k_slot <= q_slot
    glob = causal[None] & kv_mask[:, None, :]
    if cfg.sliding_window:
        local = glob & ((q_slot - k_slot) < cfg.sliding_window)[None]
    else:
        local = glob
    return glob, local


def _prepare(cfg: ModelConfig, tokens, attention_mask, positions, cache, noise):
    """Shared by the scanned and the layer-loop forward: masks, positions and the per-layer context.

    Returns (attention_mask bool [B,T], kv_mask [B,S], positions [B,T], ctx, cache index).
    """
    B, T = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    idx = cache["index"]
    kv_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, idx))
    if positions is None:
        before = jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)[:, None]
        positions = jnp.maximum(before + jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1, 0)
    glob, local = _attention_masks(cfg, kv_mask, idx, T)
    ctx = {"mask": glob, "mask_local": local, "positions": positions, "cache_index": idx,
           "sliding": jnp.asarray(cfg.sliding_layers), "noise": noise}
    if cfg.positional == "rope":
        ctx["cos"], ctx["sin"] = rope_tables(positions, cfg.head_dim, cfg.rope_theta,
                                             cfg.rope_scaling_factor)
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        local_factor = 1.0 if cfg.rope_local_theta else cfg.rope_scaling_factor
        ctx["cos_local"], ctx["sin_local"] = rope_tables(positions, cfg.head_dim, local_theta, local_factor)
    return attention_mask, kv_mask, positions, ctx, idx


def _embed(cfg: ModelConfig, table, pos_table, tokens, positions):
    """Token (+ learned position) embeddings in the compute dtype; Gemma's sqrt(D) scaling."""
    x = jnp.take(table, tokens, axis=0).astype(_dt(cfg.dtype))
    if cfg.is_gemma:  # Gemma scales embeddings by sqrt(D), rounded to the compute dtype as HF does
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), _dt(cfg.dtype))
    if pos_table is not None:
        x = x + jnp.take(pos_table, positions, axis=0).astype(x.dtype)
    return x


class Decoder(nn.Module):
    """Decoder-only LM. `__call__(tokens, attention_mask, positions, cache, noise)`."""
    cfg: ModelConfig
    remat: bool = False  # rematerialise blocks in the backward pass (training large models)
    unroll: int = 1      # layers per scan iteration (decode steps on GPUs: fewer loop trips)

    @nn.compact
    def __call__(self, tokens, attention_mask=None, positions=None, cache=None,
                 noise: Optional[ActNoise] = None, compute_logits: bool = True,
                 logits_last: Optional[int] = None) -> DecoderOutput:
        cfg = self.cfg
        B, T = tokens.shape
        use_cache = cache is not None
        if not use_cache:
            cache = init_cache(cfg, B, T)
        attention_mask, kv_mask, positions, ctx, idx = _prepare(cfg, tokens, attention_mask, positions,
                                                                cache, noise)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=_dt(cfg.param_dtype),
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        pe = None
        if cfg.is_gpt2:
            pe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, param_dtype=_dt(cfg.param_dtype),
                          embedding_init=nn.initializers.normal(0.01), name="pos_embed")
        x = _embed(cfg, embed.embedding, None if pe is None else pe.embedding, tokens, positions)

        block = Block
        if self.remat:
            block = nn.remat(Block, prevent_cse=False)
        Stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast), length=cfg.num_layers, unroll=self.unroll)
        (x, k_new, v_new), _ = Stack(cfg, name="layers")(
            (x, cache["k"], cache["v"]), jnp.arange(cfg.num_layers), ctx)
        x = make_norm(cfg, "final_norm")(x)

        new_cache = None
        if use_cache:
            new_cache = {"k": k_new, "v": v_new, "mask": kv_mask, "index": idx + T}
        logits = None
        if compute_logits:
            xh, pos_h = x, positions
            if logits_last is not None:  # e.g. prefill: the head only for the last slot(s)
                xh, pos_h = x[:, -logits_last:], positions[:, -logits_last:]
            if cfg.tie_embeddings:
                logits = embed.attend(xh.astype(_dt(cfg.dtype)))
            else:
                logits = _dense(cfg, cfg.vocab_size, "lm_head", False)(xh)
            logits = _finish_logits(cfg, logits, noise, pos_h)
        return DecoderOutput(logits, x, new_cache)


def _finish_logits(cfg: ModelConfig, logits, noise: Optional[ActNoise], positions):
    """float32, head noise (ES node perturbation), final softcap."""
    logits = logits.astype(jnp.float32)
    if noise is not None:
        logits = _add_noise(noise, "head", 0, noise.head_scale, logits, positions)
    if cfg.final_logit_softcap:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


def split_cache(cache: Dict[str, Any]) -> Dict[str, Any]:
    """Stacked cache (k, v [L, B, K, S, hd]) -> one buffer per layer (tuples of [B, K, S, hd]).

    With per-layer buffers, `forward` runs the layers as an unrolled Python loop: each decode step
    updates every buffer in place and attention reads it directly, where a stacked cache makes XLA
    copy the layer's slice out before each attention (two cache-sized copies per layer per step).
    """
    if isinstance(cache["k"], (tuple, list)):
        return cache
    L = cache["k"].shape[0]
    return dict(cache, k=tuple(cache["k"][l] for l in range(L)), v=tuple(cache["v"][l] for l in range(L)))


class LayerSplit(NamedTuple):
    """Per-layer weights with the small leaves kept stacked (`split_layers(..., small_below=n)`).

    big: L per-layer trees of the large leaves (None where a leaf is small); small: the layers'
    tree of the small leaves, stacked [L, ...] (None where a leaf is large). Carried through a loop
    of training steps, each small leaf (a bias, a norm scale) stays one array, so its optimizer
    update and gradient-norm term are one kernel each rather than L.
    """
    big: tuple
    small: Any


def _is_none(x) -> bool:
    return x is None


def _layer_tree(split: LayerSplit, l: int):
    """Layer l of a LayerSplit as one plain tree (its small leaves sliced out of the stack)."""
    return jax.tree_util.tree_map(lambda b, s: s[l] if b is None else b, split.big[l], split.small,
                                  is_leaf=_is_none)


def split_layers(layers, small_below: int = 0):
    """Stacked layer parameters (leading axis L) -> a tuple of L per-layer trees (no-op if split).

    The sampler splits once before its decode loop: slicing a layer out of the stacked weights
    inside the loop costs a device copy of every weight matrix at every step.
    small_below > 0: a `LayerSplit` instead, leaves with fewer elements per layer stay stacked
    (the PPO update's carry). A LayerSplit given with small_below = 0 becomes the plain tuple.
    """
    if isinstance(layers, LayerSplit):
        return layers if small_below else tuple(_layer_tree(layers, l) for l in range(len(layers.big)))
    if isinstance(layers, (tuple, list)):
        return tuple(layers)
    L = jax.tree_util.tree_leaves(layers)[0].shape[0]
    if not small_below:
        return tuple(jax.tree_util.tree_map(lambda a: a[l], layers) for l in range(L))

    def small(a) -> bool:
        return math.prod(a.shape[1:]) < small_below

    big = tuple(jax.tree_util.tree_map(lambda a: None if small(a) else a[l], layers) for l in range(L))
    return LayerSplit(big, jax.tree_util.tree_map(lambda a: a if small(a) else None, layers))


def stack_layers(layers):
    """Inverse of `split_layers`: per-layer trees (a tuple or a LayerSplit) -> one tree with a leading axis L."""
    if isinstance(layers, LayerSplit):
        big = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers.big)
        return jax.tree_util.tree_map(lambda b, s: s if b is None else b, big, layers.small, is_leaf=_is_none)
    if not isinstance(layers, (tuple, list)):
        return layers
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)


# Projections that read the same input, joined on their output axis by `join_projections`:
# (module, parts in order, joined name).
_JOINS = (("attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
          ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))


def join_projections(layers, qkv: bool = True, gate_up: bool = True):
    """Layer params (stacked or one layer's) with projections of one input joined into one.

    qkv: attn q/k/v -> 'qkv_proj'; gate_up: a gated MLP's gate/up -> 'gate_up_proj' (no-op without
    a gate). Kernels and biases are concatenated on their output axis, so one gemm computes the
    parts (and in the backward one gemm each gives the input gradient and the weight gradient,
    where one per part did). Elementwise optimizer states and gradient masks laid out like the
    params join the same way; `split_projections` splits them back exactly.
    """
    for module, parts, joined in _JOINS:
        if not {"attn": qkv, "mlp": gate_up}[module]:
            continue
        sub = layers.get(module, {})
        if joined in sub or not all(n in sub for n in parts):
            continue
        cat = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=-1), *(sub[n] for n in parts))
        layers = {**layers, module: {**{k: v for k, v in sub.items() if k not in parts}, joined: cat}}
    return layers


def split_projections(layers, cfg: ModelConfig):
    """Inverse of `join_projections`."""
    hd, H, K = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    cuts = {"attn": [H * hd, (H + K) * hd], "mlp": [cfg.intermediate_size]}
    for module, parts, joined in _JOINS:
        sub = layers.get(module, {})
        if joined not in sub:
            continue
        pieces = jax.tree_util.tree_map(lambda a: jnp.split(a, cuts[module], axis=-1), sub[joined])
        back = {n: jax.tree_util.tree_map(lambda p, i=i: p[i], pieces, is_leaf=lambda x: isinstance(x, list))
                for i, n in enumerate(parts)}
        layers = {**layers, module: {**{k: v for k, v in sub.items() if k != joined}, **back}}
    return layers


def map_layers(tree, fn):
    """`tree` with fn applied to every entry named 'layers' (params, or optax states that mirror them).

    Walks dicts, tuples, lists and NamedTuples (optax states); e.g. `map_layers(state, split_layers)`.
    """
    if isinstance(tree, dict):
        return {k: fn(v) if k == "layers" else map_layers(v, fn) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_layers(v, fn) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_layers(v, fn) for v in tree)
    return tree


def _layer_count(layers) -> int:
    """Blocks held by params['layers'] or a cache's k: a tuple of per-layer entries or a stacked array/tree."""
    if isinstance(layers, LayerSplit):
        return len(layers.big)
    if isinstance(layers, (tuple, list)):
        return len(layers)
    return jax.tree_util.tree_leaves(layers)[0].shape[0]


def _range_setup(params, cfg: ModelConfig, tokens, positions, cache, start_layer: int, start_hidden,
                 capture_layer: Optional[int]):
    """Checks of a partial forward; returns (x0, param layer offset, cache layer offset).

    params['layers'] holds all L blocks or only blocks [start_layer, L); the cache likewise.
    x0: start_hidden in the compute dtype, or the embeddings when start_hidden is None.
    """
    L = cfg.num_layers
    if not 0 <= start_layer < L:
        raise ValueError(f"start_layer={start_layer} must be in [0, {L})")
    if start_layer and start_hidden is None:
        raise ValueError("start_layer > 0 needs start_hidden (the residual stream entering that block)")
    if capture_layer is not None and not start_layer <= capture_layer <= L:
        raise ValueError(f"capture_layer={capture_layer} must be in [start_layer={start_layer}, {L}]")
    offsets = []
    for what, n in (("params['layers']", _layer_count(params["layers"])), ("cache", _layer_count(cache["k"]))):
        if n not in (L, L - start_layer):
            raise ValueError(f"{what} holds {n} blocks; expected {L} or {L - start_layer} (from block {start_layer})")
        offsets.append(L - n)
    if start_hidden is None:
        pos_table = params["pos_embed"]["embedding"] if cfg.is_gpt2 else None
        x = _embed(cfg, params["embed"]["embedding"], pos_table, tokens, positions)
    else:
        if start_hidden.shape != tokens.shape + (cfg.hidden_size,):
            raise ValueError(f"start_hidden {start_hidden.shape} must be [B, T, D] = {tokens.shape + (cfg.hidden_size,)}")
        x = start_hidden.astype(_dt(cfg.dtype))
    return x, offsets[0], offsets[1]


def _finish(params, cfg: ModelConfig, x, positions, noise, compute_logits: bool, logits_last: Optional[int]):
    """Final norm (+ head on all or the last `logits_last` slots) -> (logits or None, normed x)."""
    x = make_norm(cfg, "final_norm").apply({"params": params["final_norm"]}, x)
    logits = None
    if compute_logits:
        xh, pos_h = x, positions
        if logits_last is not None:
            xh, pos_h = x[:, -logits_last:], positions[:, -logits_last:]
        if cfg.tie_embeddings:
            raw = _head_matmul(params, cfg, xh)
        else:  # the Decoder's Dense (module path 'lm_head'): Dense interceptors see the head here too
            raw = _UntiedHead(cfg).apply({"params": {"lm_head": params["lm_head"]}}, xh)
        logits = _finish_logits(cfg, raw, noise, pos_h)
    return logits, x


def _forward_layer_loop(params, cfg: ModelConfig, tokens, attention_mask, positions, cache, noise,
                        compute_logits: bool, logits_last: Optional[int], capture_layer: Optional[int] = None,
                        start_layer: int = 0, start_hidden=None) -> DecoderOutput:
    """`forward` with per-layer cache buffers: the same Block, applied layer by layer (unrolled).

    Runs blocks [start_layer, L) (from `start_hidden` when given, else from the embeddings);
    `captured` is the residual stream entering block `capture_layer`.
    """
    T = tokens.shape[1]
    L = cfg.num_layers
    _, kv_mask, positions, ctx, idx = _prepare(cfg, tokens, attention_mask, positions, cache, noise)
    x, p_off, c_off = _range_setup(params, cfg, tokens, positions, cache, start_layer, start_hidden, capture_layer)
    block = _OneBlock(cfg)
    layers = split_layers(params["layers"])
    ks, vs = list(cache["k"][:start_layer - c_off]), list(cache["v"][:start_layer - c_off])  # blocks not run: kept
    captured = None
    for l in range(start_layer, L):
        if l == capture_layer:
            captured = x
        (x, k_l, v_l) = block.apply({"params": {"layers": layers[l - p_off]}},
                                    (x, cache["k"][l - c_off], cache["v"][l - c_off]), l, ctx)
        ks.append(k_l)
        vs.append(v_l)
    if capture_layer == L:
        captured = x
    logits, x = _finish(params, cfg, x, positions, noise, compute_logits, logits_last)
    new_cache = {"k": tuple(ks), "v": tuple(vs), "mask": kv_mask, "index": idx + T}
    return DecoderOutput(logits, x, new_cache, captured)


def _fused_decode_forward(params, cfg: ModelConfig, tokens, attention_mask, positions, cache,
                          compute_logits: bool) -> DecoderOutput:
    """A GPT-2 decode step (T = 1, per-layer caches, joined q/k/v) in fewer kernels than the Block.

    Per layer: `add_norm` (the previous projection's bias and residual add with this norm: one
    kernel where XLA runs three), the q/k/v gemm, `decode_attention_qkv` (q/k/v bias, cache writes
    and attention: one kernel where XLA runs four), the output gemm, `add_norm`, the up gemm with
    its bias and GELU, the down gemm (its bias and residual add go to the next `add_norm`). Same
    arithmetic as the Block up to the order of the norms' sums (tests: `test_fused_decode.py`).
    """
    B, T = tokens.shape
    _, kv_mask, positions, ctx, idx = _prepare(cfg, tokens, attention_mask, positions, cache, None)
    x, _, _ = _range_setup(params, cfg, tokens, positions, cache, 0, None, None)
    dt, D, H, hd = _dt(cfg.dtype), cfg.hidden_size, cfg.num_heads, cfg.head_dim
    norm = functools.partial(add_norm_kernel.add_norm, eps=cfg.norm_eps)
    attend = functools.partial(decode_kernel.decode_attention_qkv, heads=H, scale=cfg.attn_scale,
                               attention=functools.partial(_cache_write_attention, cfg))

    def dense(h, p):  # nn.Dense's product (the bias is added by the caller's next kernel)
        return jnp.dot(h.astype(dt), p["kernel"].astype(dt))

    x = x.reshape(B, D)
    y = y_bias = None  # the last projection's output and bias, not yet added to the stream
    ks, vs = [], []
    for l, p in enumerate(split_layers(params["layers"])):
        x, h = norm(x, y, y_bias, p["input_norm"]["scale"], p["input_norm"]["bias"], out_dtype=dt)
        qkv = p["attn"]["qkv_proj"]
        o, k_l, v_l = attend(dense(h, qkv).reshape(B, 1, -1), qkv.get("bias"), cache["k"][l], cache["v"][l],
                             ctx["mask"], idx)
        ks.append(k_l)
        vs.append(v_l)
        y, y_bias = dense(o.reshape(B, H * hd), p["attn"]["o_proj"]), p["attn"]["o_proj"]["bias"]
        x, h = norm(x, y, y_bias, p["pre_mlp_norm"]["scale"], p["pre_mlp_norm"]["bias"], out_dtype=dt)
        up, down = p["mlp"]["up_proj"], p["mlp"]["down_proj"]
        y, y_bias = dense(_act(cfg, dense(h, up) + up["bias"].astype(dt)), down), down["bias"]
    fn = params["final_norm"]
    _, hidden = norm(x, y, y_bias, fn["scale"], fn["bias"])
    hidden = hidden.reshape(B, T, D)
    logits = _finish_logits(cfg, _head_matmul(params, cfg, hidden), None, positions) if compute_logits else None
    return DecoderOutput(logits, hidden, {"k": tuple(ks), "v": tuple(vs), "mask": kv_mask, "index": idx + T})


def _joined_qkv(layers) -> bool:
    first = layers.big[0] if isinstance(layers, LayerSplit) else (
        layers[0] if isinstance(layers, (tuple, list)) else layers)
    return "qkv_proj" in first.get("attn", {})


def _forward_range(params, cfg: ModelConfig, tokens, attention_mask, positions, cache, noise,
                   compute_logits: bool, logits_last: Optional[int], remat: bool, unroll: int,
                   capture_layer: Optional[int], start_layer: int, start_hidden) -> DecoderOutput:
    """`forward` on stacked weights, split at `capture_layer` and/or started at `start_layer`.

    The blocks run as one or two `nn.scan`s over slices of the stacked weights ([start, j) and
    [j, L)); the residual stream between them is `captured`. A stacked cache may hold all L blocks
    or only [start_layer, L) (`init_cache(..., layers=L - start_layer)`).
    """
    B, T = tokens.shape
    L = cfg.num_layers
    use_cache = cache is not None
    if not use_cache:
        cache = init_cache(cfg, B, T, layers=L - start_layer)
    _, kv_mask, positions, ctx, idx = _prepare(cfg, tokens, attention_mask, positions, cache, noise)
    x, p_off, c_off = _range_setup(params, cfg, tokens, positions, cache, start_layer, start_hidden, capture_layer)
    if c_off:
        ctx = dict(ctx, cache_layer0=jnp.int32(c_off))
    cuts = sorted({start_layer, L} | ({capture_layer} if capture_layer is not None else set()))
    k, v = cache["k"], cache["v"]
    captured = None
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a == capture_layer:
            captured = x
        seg = jax.tree_util.tree_map(lambda w: w[a - p_off:b - p_off], params["layers"])
        x, k, v = _Blocks(cfg, b - a, remat, unroll).apply({"params": {"layers": seg}}, (x, k, v),
                                                            jnp.arange(a, b), ctx)
    if capture_layer == L:
        captured = x
    logits, x = _finish(params, cfg, x, positions, noise, compute_logits, logits_last)
    new_cache = None
    if use_cache:
        new_cache = {"k": k, "v": v, "mask": kv_mask, "index": idx + T}
    return DecoderOutput(logits, x, new_cache, captured)


def init_params(cfg: ModelConfig, key, seq_len: int = 4) -> Dict[str, Any]:
    """Random parameters at the config's real shapes (plain nested dict)."""
    model = Decoder(cfg)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = model.init(key, tokens, compute_logits=True)
    params = jax.tree_util.tree_map(lambda x: x, dict(variables["params"]))
    return _to_dict(params)


def _to_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def forward(params, cfg: ModelConfig, tokens, attention_mask=None, positions=None, cache=None,
            noise: Optional[ActNoise] = None, compute_logits: bool = True, remat: bool = False,
            logits_last: Optional[int] = None, unroll: int = 1, capture_layer: Optional[int] = None,
            start_layer: int = 0, start_hidden=None) -> DecoderOutput:
    """Functional entry point: `Decoder(cfg).apply({'params': params}, ...)`.

    logits_last: when set, logits [B, logits_last, V] for the last slots only (hidden stays [B, T, D]).
    unroll: layers per iteration of the layer scan (same result; trades compile time for speed).
    params['layers'] may be a tuple of per-layer trees or a `LayerSplit` (`split_layers`): the layers
      then run as an unrolled loop (same result), e.g. inside a loop of training steps that carries
      the weights.
    capture_layer: j in [0, L]: also return `captured` [B, T, D] (compute dtype), the residual stream
      entering block j (j = L: leaving the last block, before the final norm).
    start_layer, start_hidden [B, T, D]: skip the embeddings and blocks < start_layer; run blocks
      [start_layer, L) from start_hidden (the stream entering block start_layer, e.g. a `captured`).
      tokens still give the shapes (and, with attention_mask, the positions and masks).
      params['layers'] and a given cache may then hold only blocks [start_layer, L).
    Without these three arguments the compiled program is the plain Decoder's.
    A single-token step over per-layer caches of a GPT-2 model whose layers hold joined q/k/v
    (`join_projections`, as the sampler passes them) runs `_fused_decode_forward` where
    `fused_decode_applies` (same values up to the norms' summation order).
    """
    if cache is not None and isinstance(cache["k"], (tuple, list)):  # per-layer buffers: see split_cache
        if (tokens.shape[1] == 1 and capture_layer is None and not start_layer and start_hidden is None
                and _joined_qkv(params["layers"]) and fused_decode_applies(cfg, cache["k"][0].shape[2], noise)):
            return _fused_decode_forward(params, cfg, tokens, attention_mask, positions, cache, compute_logits)
        return _forward_layer_loop(params, cfg, tokens, attention_mask, positions, cache, noise,
                                   compute_logits, logits_last, capture_layer, start_layer, start_hidden)
    if cache is None and isinstance(params["layers"], (tuple, list)):  # per-layer weights, no cache
        if remat:
            raise ValueError("remat needs stacked layers (per-layer weights run as an unrolled loop)")
        fresh = split_cache(init_cache(cfg, tokens.shape[0], tokens.shape[1], layers=cfg.num_layers - start_layer))
        return _forward_layer_loop(params, cfg, tokens, attention_mask, positions, fresh, noise, compute_logits,
                                   logits_last, capture_layer, start_layer, start_hidden)._replace(cache=None)
    if capture_layer is not None or start_layer or start_hidden is not None:
        return _forward_range(params, cfg, tokens, attention_mask, positions, cache, noise, compute_logits,
                              logits_last, remat, unroll, capture_layer, start_layer, start_hidden)
    return Decoder(cfg, remat=remat, unroll=unroll).apply({"params": params}, tokens, attention_mask, positions, cache,
                                           noise, compute_logits, logits_last)


def _head_matmul(params, cfg: ModelConfig, hidden):
    """hidden [..., D] -> raw head output [..., V] in the compute dtype (tied or untied head)."""
    dt = _dt(cfg.dtype)
    h = hidden.astype(dt)
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"]["embedding"].astype(dt))
    return jnp.einsum("...d,dv->...v", h, params["lm_head"]["kernel"].astype(dt))


def lm_logits(params, cfg: ModelConfig, hidden) -> jax.Array:
    """Head on (a slice of) final hidden states `[..., D]` -> float32 logits `[..., V]`.

    Lets trainers run the trunk with `compute_logits=False` and project only the positions they
    score (the response tokens), instead of materialising `[B, T, V]` for the whole sequence.
    """
    return _finish_logits(cfg, _head_matmul(params, cfg, hidden), None, None)
