"""The fused GPT-2 decode step (`decoder._fused_decode_forward`) and its kernels (`kernels.add_norm`,
`kernels.decode_attention.decode_attention_qkv`) against the Block's XLA path."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxrl_sparse import generate as gen
from jaxrl_sparse.kernels import add_norm as an
from jaxrl_sparse.kernels import decode_attention as da
from jaxrl_sparse.models import decoder
from jaxrl_sparse.models.config import preset

TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
TINY = preset("gpt2").replace(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4,
                              head_dim=16, vocab_size=97)


def _rows(R=5, D=64, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x, y = (3 * jax.random.normal(k, (R, D)) for k in ks[:2])
    b, s, nb = (jax.random.normal(k, (D,)) for k in ks[2:])
    return x, y, b, s, nb


def _flax_ln(x, s, nb, eps=1e-5):
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32).apply({"params": {"scale": s, "bias": nb}}, x)


@pytest.mark.parametrize("with_y", [True, False])
def test_add_norm_equals_residual_add_and_flax_layernorm(with_y):
    x, y, b, s, nb = _rows()
    want_x = x + (y + b) if with_y else x
    want_h = _flax_ln(want_x, s, nb)
    args = (x, y if with_y else None, b if with_y else None, s, nb)
    rx, rh = an.reference(*args, eps=1e-5)              # the XLA form: exactly Flax's arithmetic
    np.testing.assert_array_equal(np.asarray(rx), np.asarray(want_x))
    np.testing.assert_array_equal(np.asarray(rh), np.asarray(want_h))
    kx, kh = an.add_norm(*args, eps=1e-5, interpret=True)  # the kernel: only the sums' order differs
    np.testing.assert_array_equal(np.asarray(kx), np.asarray(want_x))
    np.testing.assert_allclose(np.asarray(kh), np.asarray(want_h), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(kh), np.asarray(x))


def test_add_norm_bf16_stream():
    """bf16 stream: the residual add rounds in bf16 as XLA's does; the normed row comes out in the
    requested dtype (what the next gemm reads)."""
    x, y, b, s, nb = _rows(seed=1)
    xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    rx, rh = an.reference(xb, yb, b, s, nb, eps=1e-5, out_dtype=jnp.bfloat16)
    kx, kh = an.add_norm(xb, yb, b, s, nb, eps=1e-5, out_dtype=jnp.bfloat16, interpret=True)
    assert kx.dtype == kh.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kx, np.float32), np.asarray(rx, np.float32))
    np.testing.assert_allclose(np.asarray(kh, np.float32), np.asarray(rh, np.float32), atol=4e-2)


def test_add_norm_support():
    assert an.supported(1024) and an.supported(64)
    assert not an.supported(768) and not an.supported(8)


@pytest.mark.parametrize("with_bias", [True, False])
def test_qkv_attention_equals_split_bias_and_xla_attention(with_bias):
    """The joined-projection kernel (interpreted) against bias add, split and the XLA cache writes +
    attention: output close, both caches equal (the biased k and v written at the new slot)."""
    B, H, K, S, hd, idx = 3, 4, 2, 21, 16, 13
    cfg = preset("gpt2").replace(num_heads=H, num_kv_heads=K, head_dim=hd, hidden_size=H * hd)
    ks = jax.random.split(jax.random.key(2), 4)
    qkv = jax.random.normal(ks[0], (B, 1, (H + 2 * K) * hd))
    bias = jax.random.normal(ks[1], ((H + 2 * K) * hd,)) if with_bias else None
    kc, vc = (jax.random.normal(k, (B, K, S, hd)) for k in ks[2:])
    vis = np.ones((B, 1, S), bool)
    vis[:, :, idx + 1:] = False
    vis[0, :, :3] = False
    mask, index = jnp.asarray(vis), jnp.int32(idx)
    attention = lambda *a: decoder._cache_write_attention(cfg, *a)  # noqa: E731
    want = da.reference_qkv(qkv, bias, kc, vc, mask, index, heads=H, attention=attention)
    got = da.decode_attention_qkv(qkv, bias, kc, vc, mask, index, heads=H, scale=cfg.attn_scale,
                                  attention=attention, interpret=True)
    assert got[0].shape == (B, 1, H * hd)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=2e-5, atol=2e-6)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    new_k = (qkv + (bias if with_bias else 0))[:, 0, H * hd:(H + K) * hd].reshape(B, K, hd)
    np.testing.assert_allclose(np.asarray(got[1][:, :, idx]), np.asarray(new_k), rtol=1e-6)


def _generate(params, cfg=TINY):
    toks = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 4, 2]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    gen.compiled_sampler.cache_clear()
    try:
        return gen.generate(params, cfg, toks, mask, jax.random.key(3), max_new_tokens=6, layer_loop=True,
                            fixed_length=True, eos_token_id=[], mesh=False)
    finally:
        gen.compiled_sampler.cache_clear()


@pytest.fixture
def tiny_params():
    params = decoder.init_params(TINY, jax.random.key(0))  # biases and norm offsets away from 0 and 1
    return jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)


def test_generate_with_the_fused_step_equals_the_block(monkeypatch, tiny_params):
    """A sampled layer-loop decode with every step fused: the XLA forms give the Block's tokens and
    log-probs exactly; the interpreted kernels give the same tokens, log-probs to rounding."""
    want = _generate(tiny_params)
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "pallas")  # what 'auto' picks on a GPU
    calls = []
    fused = decoder._fused_decode_forward
    monkeypatch.setattr(decoder, "_fused_decode_forward", lambda *a, **k: calls.append(1) or fused(*a, **k))
    got = _generate(tiny_params)
    assert calls  # the decode step was traced through the fused path
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.logprobs), np.asarray(want.logprobs))
    monkeypatch.setattr(da, "decode_attention_qkv", lambda *a, **k: da.pallas_decode_attention_qkv(
        *a, heads=k["heads"], scale=k["scale"], interpret=True))
    monkeypatch.setattr(an, "add_norm", lambda *a, **k: an.pallas_add_norm(*a, **k, interpret=True))
    got = _generate(tiny_params)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)


def test_where_the_fused_step_applies(monkeypatch):
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "pallas")
    cfg = preset("gpt2-medium")
    assert decoder.fused_decode_applies(cfg, 81)
    assert not decoder.fused_decode_applies(preset("gpt2"), 81)          # width 768: not a power of two
    assert not decoder.fused_decode_applies(preset("smollm2-135m"), 81)   # RMSNorm, RoPE, gated MLP
    assert not decoder.fused_decode_applies(cfg, 4)                       # too few slots for the attention kernel
    noise = decoder.ActNoise(jnp.zeros((2, 2), jnp.uint32), jnp.zeros(24), jnp.zeros(24), jnp.zeros(()))
    assert not decoder.fused_decode_applies(cfg, 81, noise)               # ES node perturbation
    with nn.intercept_methods(lambda f, a, k, c: f(*a, **k)):             # LoRA, ES low-rank, captures
        assert not decoder.fused_decode_applies(cfg, 81)
    with decoder.sharded_decode():
        assert not decoder.fused_decode_applies(cfg, 81)
    monkeypatch.setattr(decoder, "FUSED_DECODE", "off")
    assert not decoder.fused_decode_applies(cfg, 81)
    monkeypatch.setattr(decoder, "FUSED_DECODE", "on")
    with pytest.raises(Exception, match="JAXRL_FUSED_DECODE='on': choose auto or off"):
        decoder.fused_decode_applies(cfg, 81)
    monkeypatch.setattr(decoder, "FUSED_DECODE", "auto")
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "auto")
    assert decoder.fused_decode_applies(cfg, 81) == decoder._cuda_capable()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a CPU-side export check (JAX 0.11.2 on the H100 "
                    "raises in the Triton lowering when exporting there; the GPU test below runs the kernels)")
def test_fused_step_lowers_for_cuda(monkeypatch):
    """A gpt2-medium-shaped decode step with joined q/k/v lowered for CUDA on this CPU: per layer two
    add_norm kernels and one attention kernel, plus the final norm; caches aliased in place."""
    cfg = preset("gpt2-medium").replace(num_layers=2)
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "pallas")
    B, S = 16, 81
    params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: decoder.split_cache(decoder.init_cache(cfg, B, S)))
    layers = jax.eval_shape(lambda p: decoder.split_layers(decoder.join_projections(p["layers"], gate_up=False)),
                            params)

    def step(params, layers, cache, tok):
        return decoder.forward(dict(params, layers=layers), cfg, tok, cache=cache).logits

    tok = jax.ShapeDtypeStruct((B, 1), jnp.int32)
    text = export.export(jax.jit(step), platforms=("cuda",), disabled_checks=[TRITON])(
        params, layers, cache, tok).mlir_module()
    assert text.count('name = "add_norm"') == 2 * cfg.num_layers + 1
    assert text.count('name = "decode_attention"') == cfg.num_layers
    assert text.count("stablehlo.output_operand_alias<") == 2 * cfg.num_layers  # k and v caches in place


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (the Triton kernels)")
def test_fused_step_on_gpu_matches_the_block():
    """The kernels themselves (CUDA): gpt2-medium (4 layers, random weights with their biases and
    norms perturbed), fp32 with exact float32 gemms so that only the kernels' rounding is left;
    six teacher-forced decode steps after a left-padded prefill. Run on a GPU machine:
    `python -m pytest -q tests/test_fused_decode.py`."""
    cfg = preset("gpt2-medium").replace(num_layers=4)
    B, P, steps = 16, 24, 6
    params = decoder.init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, P + steps)), jnp.int32)
    mask = np.ones((B, P + steps), np.int32)
    mask[:4, :5] = 0  # left padding
    mask = jnp.asarray(mask)
    layers = decoder.split_layers(decoder.join_projections(params["layers"], gate_up=False))
    with jax.default_matmul_precision("highest"):
        pre = jax.jit(lambda t, m: decoder.forward(params, cfg, t, m, cache=decoder.init_cache(cfg, B, P + 8)))(
            toks[:, :P], mask[:, :P])
        logits = {}
        for mode in ("off", "auto"):
            decoder.FUSED_DECODE = mode  # read while tracing: a fresh jit per mode
            step = jax.jit(lambda ls, t, m, c: decoder.forward(dict(params, layers=ls), cfg, t, m, cache=c))
            try:
                c, out = decoder.split_cache(pre.cache), []
                for s in range(steps):
                    o = step(layers, toks[:, P + s:P + s + 1], mask[:, P + s:P + s + 1], c)
                    c = o.cache
                    out.append(np.asarray(o.logits[:, 0]))
                logits[mode] = np.stack(out)
            finally:
                decoder.FUSED_DECODE = "auto"
    assert decoder.fused_decode_applies(cfg, P + 8)
    scale = np.abs(logits["off"]).max()
    np.testing.assert_allclose(logits["auto"], logits["off"], atol=2e-5 * scale, rtol=0)
    assert not np.array_equal(logits["auto"][0], logits["auto"][1])  # the steps advance
