"""Decode attention + KV-cache write as one kernel (`kernels.decode_attention`) against the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxrl_sparse.kernels import decode_attention as da
from jaxrl_sparse.models import decoder
from jaxrl_sparse.models.config import preset

TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _case(B, H, K, S, hd, idx, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, 1, H, hd), dtype)
    kn, vn = (jax.random.normal(k, (B, K, 1, hd), dtype) for k in ks[1:3])
    kc, vc = (jax.random.normal(k, (B, K, S, hd), dtype) for k in ks[3:5])  # stale data past idx too
    vis = np.ones((B, 1, S), bool)
    vis[:, :, idx + 1:] = False               # causal: nothing after the new slot
    vis[0, :, :min(3, idx)] = False            # row 0: a left-padded prompt
    if B > 2:
        vis[2, :, idx] = False                 # row 2: the new token itself is masked (a finished row)
    return q, kn, vn, kc, vc, jnp.asarray(vis), jnp.int32(idx)


@pytest.mark.parametrize("B,H,K,S,hd,idx,block", [
    (3, 4, 4, 21, 16, 13, 8),     # gpt2-like heads; 21 slots: the last block shifts back inside the cache
    (3, 8, 2, 40, 32, 39, 32),    # grouped-query (4 query heads per kv head); the last slot
    (2, 4, 1, 16, 8, 0, 32),      # the first decode slot: only the new token is visible
    (3, 6, 2, 24, 16, 17, 16),    # 3 query heads per kv head (not a power of two)
])
def test_kernel_equals_xla_cache_write_and_attention(B, H, K, S, hd, idx, block):
    """The kernel (Pallas interpreter) against decoder._cache_write_attention: attention output and
    both caches (the new token written at idx, every other slot untouched)."""
    cfg = preset("gpt2").replace(num_heads=H, num_kv_heads=K, head_dim=hd, hidden_size=H * hd)
    args = _case(B, H, K, S, hd, idx)
    want = decoder._cache_write_attention(cfg, *args)
    got = da.decode_attention(*args, scale=cfg.attn_scale, fallback=None, block=block, interpret=True)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=2e-5, atol=2e-6)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert not np.allclose(np.asarray(want[1]), np.asarray(args[3]))  # the write happened


def test_bf16_cache():
    """bf16 q and caches: scores in float32 in both paths; outputs agree to bf16 rounding."""
    cfg = preset("gpt2").replace(num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
    args = _case(2, 4, 2, 32, 16, 20, jnp.bfloat16)
    want = decoder._cache_write_attention(cfg, *args)
    got = da.decode_attention(*args, scale=cfg.attn_scale, fallback=None, interpret=True)
    assert got[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), atol=2e-2)
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))


def test_block_slots_and_support():
    assert [da.block_slots(s) for s in (8, 21, 32, 81, 400)] == [8, 16, 32, 32, 32]
    assert da.supported(64, 81) and da.supported(128, 8)
    assert not da.supported(80, 100) and not da.supported(64, 4)  # head size not a power of two; tiny cache


def test_impl_choice(monkeypatch):
    """'pallas' only for one layer's own cache (the layer loop), single-token queries, unsharded
    decodes and supported shapes; 'auto' on a CPU stays on XLA."""
    cfg = preset("gpt2-medium")
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "pallas")
    assert decoder.decode_attention_impl(cfg, 1, 81, layer_cache=True) == "pallas"
    assert decoder.decode_attention_impl(cfg, 1, 81) == "xla"                    # stacked (scanned) cache
    assert decoder.decode_attention_impl(cfg, 80, 81, layer_cache=True) == "xla"  # prefill / training
    with decoder.sharded_decode():
        assert decoder.decode_attention_impl(cfg, 1, 81, layer_cache=True) == "xla"
    with decoder.xla_attention():
        assert decoder.decode_attention_impl(cfg, 1, 81, layer_cache=True) == "xla"
    assert decoder.decode_attention_impl(cfg.replace(head_dim=80), 1, 81, layer_cache=True) == "xla"
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "auto")
    want = "pallas" if decoder._cuda_capable() else "xla"
    assert decoder.decode_attention_impl(cfg, 1, 81, layer_cache=True) == want


def _generate(cfg, params, **kw):
    from jaxrl_sparse.generate import generate
    toks = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 4, 2]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    return generate(params, cfg, toks, mask, jax.random.key(3), max_new_tokens=6, layer_loop=True,
                    fixed_length=True, eos_token_id=[], mesh=False, **kw)


def test_generate_with_the_interpreted_kernel_equals_xla(monkeypatch):
    """A layer-loop decode (left-padded prompt, sampling) with every layer's attention and cache
    write in the kernel (interpreted) gives the XLA path's tokens and log-probs."""
    cfg = preset("gpt2").replace(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                                 num_kv_heads=4, head_dim=16, vocab_size=97)
    params = decoder.init_params(cfg, jax.random.key(0))
    want = _generate(cfg, params)
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "pallas")
    monkeypatch.setattr(decoder, "FUSED_DECODE", "off")  # the Block's path (the fused step: test_fused_decode.py)
    calls = []

    def interpreted(*a, **k):
        calls.append(1)
        return da.pallas_decode_attention(*a, scale=k["scale"], interpret=True)

    monkeypatch.setattr(da, "decode_attention", interpreted)
    from jaxrl_sparse import generate as gen
    gen.compiled_sampler.cache_clear()  # trace again, now with the kernel
    got = _generate(cfg, params)
    gen.compiled_sampler.cache_clear()
    assert calls  # the kernel was traced (once per layer of the decode step)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-4, atol=1e-5)


def test_decode_step_lowers_for_cuda(monkeypatch):
    """A gpt2-medium-shaped decode step lowered for CUDA on this CPU (jax.export): one Triton kernel
    per layer, caches aliased in place, no XLA cache write; the CPU lowering keeps the XLA path."""
    cfg = preset("gpt2-medium").replace(num_layers=2)
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "pallas")
    B, S = 16, 81
    params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: decoder.split_cache(decoder.init_cache(cfg, B, S)))
    layers = jax.eval_shape(lambda p: decoder.split_layers(p["layers"]), params)

    def step(params, layers, cache, tok):
        return decoder.forward(dict(params, layers=layers), cfg, tok, cache=cache).logits

    tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
    text = export.export(jax.jit(step), platforms=("cuda",), disabled_checks=[TRITON])(
        params, layers, cache, tok).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == cfg.num_layers
    assert text.count("stablehlo.output_operand_alias<") == 2 * cfg.num_layers  # k and v caches in place
    cpu = export.export(jax.jit(step), platforms=("cpu",))(params, layers, cache, tok).mlir_module()
    dus = "stablehlo.dynamic_update_slice"
    assert "triton" not in cpu and cpu.count(dus) - text.count(dus) == 2 * cfg.num_layers  # the cache writes
