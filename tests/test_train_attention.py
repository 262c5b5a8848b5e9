"""Whole-sequence causal attention as one forward and one backward kernel (`kernels.train_attention`)
against the XLA path: outputs and gradients, GQA, left padding; the PPO update's CUDA lowering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxrl_sparse.kernels import train_attention as ta
from jaxrl_sparse.models import decoder
from jaxrl_sparse.models.config import preset

TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _case(B, T, H, K, hd, pad, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, hd))
    k, v = jax.random.normal(ks[1], (B, T, K, hd)), jax.random.normal(ks[2], (B, T, K, hd))
    kv = np.ones((B, T), bool)
    kv[0, :pad] = False                                   # row 0: a left-padded query
    mask = jnp.asarray(np.tril(np.ones((T, T), bool))[None] & kv[:, None, :])
    cot = jax.random.normal(ks[3], (B, T, H, hd))
    return q, k, v, mask, cot, kv


@pytest.mark.parametrize("B,T,H,K,hd,pad", [(2, 48, 2, 2, 16, 5), (2, 32, 4, 2, 16, 0), (1, 32, 3, 1, 32, 17)])
def test_kernels_equal_xla_attention_and_gradients(B, T, H, K, hd, pad):
    """Forward and backward kernels (Pallas interpreter) against decoder._bthd_attention and its
    autodiff gradients, on rows that see at least one key (the others are zero by design)."""
    cfg = preset("gpt2").replace(num_heads=H, num_kv_heads=K, head_dim=hd, hidden_size=H * hd)
    q, k, v, mask, cot, kv = _case(B, T, H, K, hd, pad)
    seen = jnp.asarray(kv)[:, :, None, None]  # query t of row b sees a key iff slot t is real (causal)
    ref = lambda q, k, v: jnp.sum(jnp.where(seen, decoder._bthd_attention(cfg, q, k, v, mask), 0.0) * cot)
    ker = lambda q, k, v: jnp.sum(ta.attention(q, k, v, mask, scale=cfg.attn_scale, fallback=None,
                                               interpret=True) * cot)
    want_o = decoder._bthd_attention(cfg, q, k, v, mask)
    got_o = ta.attention(q, k, v, mask, scale=cfg.attn_scale, fallback=None, interpret=True)
    np.testing.assert_allclose(np.asarray(jnp.where(seen, got_o, 0)), np.asarray(jnp.where(seen, want_o, 0)),
                               rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(jnp.where(seen, 0.0, got_o)))) == 0.0  # unseen rows: zero
    want = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(ker, argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4, err_msg=name)
        assert float(jnp.max(jnp.abs(w))) > 1e-2


def test_supported_shapes():
    assert ta.supported(80, 64) and ta.supported(32, 16)
    assert not ta.supported(40, 64) and not ta.supported(80, 80) and not ta.supported(1, 64)


def test_impl_choice(monkeypatch):
    cfg = preset("gpt2-medium")
    assert decoder.training_attention_impl(cfg, 80) == "xla"  # off unless a caller turns it on
    with decoder.training_attention_kernels():
        assert decoder.training_attention_impl(cfg, 80) == "pallas"
        assert decoder.training_attention_impl(cfg, 40) == "xla"
        assert decoder.training_attention_impl(cfg.replace(attn_logit_softcap=30.0), 80) == "xla"
        monkeypatch.setattr(decoder, "ATTENTION_IMPL", "xla")
        assert decoder.training_attention_impl(cfg, 80) == "xla"
