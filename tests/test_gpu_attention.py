"""cuDNN decode attention (`JAXRL_ATTENTION`, default auto) against the XLA path; the comparison needs a GPU.

Decode steps through the KV cache, teacher-forced, left-padded prompts of different lengths, bf16 at
the real shapes with random weights. Both bf16 paths are compared with a float32 XLA reference: the
cuDNN path must be as close to it as the XLA path is (and close to the XLA path itself).
Run on a GPU machine: `python -m pytest -q tests/test_gpu_attention.py`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models import decoder
from jaxrl_sparse.models.config import preset

B, P, STEPS = 8, 40, 6
SLOTS = 300  # cache slots: above CUDNN_MIN_SLOTS, so 'auto' picks cuDNN on a capable GPU
gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN attention)")


def test_attention_impl_choice(monkeypatch):
    """Runs everywhere: which decode attention a setting and shape get."""
    cfg = preset("smollm2-135m")
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "cudnn")
    assert decoder.decode_attention_impl(cfg, 1, 10) == "cudnn"
    assert decoder.decode_attention_impl(cfg, 2, 1000) == "xla"          # prefill / training: XLA
    assert decoder.decode_attention_impl(cfg.replace(attn_logit_softcap=50.0), 1, 1000) == "xla"
    with decoder.xla_attention():
        assert decoder.decode_attention_impl(cfg, 1, 1000) == "xla"
    assert decoder.decode_attention_impl(cfg, 1, 1000) == "cudnn"
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "xla")
    assert decoder.decode_attention_impl(cfg, 1, 1000) == "xla"
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "cuDNN")
    with pytest.raises(UserError, match="JAXRL_ATTENTION='cuDNN': choose auto, xla, cudnn or pallas"):
        decoder.decode_attention_impl(cfg, 1, 1000)
    monkeypatch.setattr(decoder, "ATTENTION_IMPL", "auto")
    assert decoder.decode_attention_impl(cfg, 1, decoder.CUDNN_MIN_SLOTS - 1) == "xla"
    want = "cudnn" if decoder._cuda_capable() else "xla"                 # CPUs: always XLA
    assert decoder.decode_attention_impl(cfg, 1, decoder.CUDNN_MIN_SLOTS) == want


def _decode_fn(cfg, tokens, mask):
    """params -> log-softmax of STEPS teacher-forced decode steps' logits [B, STEPS, V] (float32)."""

    def run(params):
        cache = decoder.init_cache(cfg, B, SLOTS)
        out = decoder.forward(params, cfg, tokens[:, :P], mask, cache=cache)
        cache, outs = out.cache, []
        for t in range(STEPS):
            out = decoder.forward(params, cfg, tokens[:, P + t:P + t + 1], jnp.ones((B, 1), jnp.bool_), cache=cache)
            cache = out.cache
            outs.append(jax.nn.log_softmax(out.logits[:, 0].astype(jnp.float32), axis=-1))
        return jnp.stack(outs, axis=1)

    return run


def _traced_with(impl: str, fn, *args):
    """jit(fn)(*args) traced with decoder.ATTENTION_IMPL = impl (read at trace time; a fresh jit)."""
    old = decoder.ATTENTION_IMPL
    decoder.ATTENTION_IMPL = impl
    try:
        return np.asarray(jax.jit(fn)(*args))
    finally:
        decoder.ATTENTION_IMPL = old


def _inputs(cfg):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P + STEPS)), jnp.int32)
    lengths = np.linspace(3, P, B).astype(int)           # left padding: row b has lengths[b] real tokens
    return tokens, jnp.asarray(np.arange(P)[None, :] >= (P - lengths)[:, None])


def _decode_logprobs(params, cfg, tokens, mask, impl: str):
    return _traced_with(impl, _decode_fn(cfg, tokens, mask), params)


@gpu_only
@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-1.5b", "gpt2-medium"])
def test_cudnn_decode_attention_matches_xla(model):
    cfg16 = preset(model, param_dtype="bfloat16", dtype="bfloat16")
    cfg32 = preset(model, param_dtype="float32", dtype="float32")
    params16 = decoder.init_params(cfg16, jax.random.key(0))
    params32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params16)
    tokens, mask = _inputs(cfg16)
    ref = _decode_logprobs(params32, cfg32, tokens, mask, "xla")
    xla = _decode_logprobs(params16, cfg16, tokens, mask, "xla")
    cud = _decode_logprobs(params16, cfg16, tokens, mask, "cudnn")
    auto = _decode_logprobs(params16, cfg16, tokens, mask, "auto")   # cuDNN here (SLOTS >= CUDNN_MIN_SLOTS)
    np.testing.assert_array_equal(auto, cud)
    assert np.isfinite(cud).all()
    err_xla, err_cud = np.abs(xla - ref).max(), np.abs(cud - ref).max()
    print(f"{model}: max |logprob - fp32 ref|: xla {err_xla:.4f}, cudnn {err_cud:.4f}; "
          f"cudnn vs xla {np.abs(cud - xla).max():.4f}")
    assert err_cud <= 1.5 * err_xla + 1e-3
    np.testing.assert_allclose(cud, xla, atol=max(2 * err_xla, 0.05))
    # the same next-token choice wherever the fp32 reference has a clear winner
    top2 = np.sort(ref, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 4 * err_xla
    assert (cud.argmax(-1) == ref.argmax(-1))[clear].all()


@gpu_only
def test_vmapped_decode_takes_the_xla_path():
    """Members decoded as a vmapped batch (full-rank ES groups) trace under `decoder.xla_attention()`:
    JAX 0.11.2's cuDNN attention fails to batch its mask; inside the block XLA attention is used."""
    cfg = preset("smollm2-135m", param_dtype="bfloat16", dtype="bfloat16")
    p0 = decoder.init_params(cfg, jax.random.key(0))
    p1 = decoder.init_params(cfg, jax.random.key(1))
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), p0, p1)
    tokens, mask = _inputs(cfg)
    fn = _decode_fn(cfg, tokens, mask)

    def vmapped(pp):
        with decoder.xla_attention():
            return jax.vmap(fn)(pp)

    got = _traced_with("cudnn", vmapped, stacked)
    assert np.abs(got[0] - got[1]).max() > 0.5          # two members, not one broadcast
    for i, p in enumerate((p0, p1)):                    # bf16: batching changes the rounding (~0.03)
        np.testing.assert_allclose(got[i], _traced_with("xla", fn, p), atol=0.1)
