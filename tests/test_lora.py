"""LoRA transform: B=0 is the base, unmerged == merged, only adapters get gradients, regex errors."""
import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig
from jaxrl_sparse.models.decoder import forward, init_params
from jaxrl_sparse.transforms import lora

CFG = ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8)
TOK = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)), jnp.int32)
MASK = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7], jnp.int32)


@functools.partial(jax.jit, static_argnames=("dropout", "remat"))
def lfwd(params, ad, key=None, dropout=0.0, remat=False):
    """Unmerged LoRA logits on the test batch (jitted: one compile instead of eager op dispatch)."""
    return lora.lora_forward(params, ad, CFG, TOK, MASK, alpha=8.0, rank=4, dropout=dropout, key=key,
                             remat=remat).logits


@jax.jit
def fwd(params):
    return forward(params, CFG, TOK, MASK).logits


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))


def _nonzero(adapters, seed=1, scale=0.1):
    leaves, tdef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tdef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_init_shapes_and_targets(params):
    ad = lora.init_lora(params, "q_proj,v_proj", 4, jax.random.key(1))
    assert lora.adapted_kernels(ad) == ["layers/attn/q_proj/kernel", "layers/attn/v_proj/kernel"]
    q = ad["layers"]["attn"]["q_proj"]
    assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 32)
    assert ad["layers"]["attn"]["v_proj"]["lora_b"].shape == (2, 4, 16)
    assert float(jnp.abs(q["lora_b"]).max()) == 0.0
    assert abs(float(q["lora_a"].std()) - 32 ** -0.5) < 0.05       # N(0, 1/in)
    every = lora.init_lora(params, ",".join(lora.MODULES), 2, jax.random.key(1))
    assert len(lora.adapted_kernels(every)) == 7
    regex = lora.init_lora(params, r"mlp/(up|down)_proj", 2, jax.random.key(1))
    assert lora.adapted_kernels(regex) == ["layers/mlp/down_proj/kernel", "layers/mlp/up_proj/kernel"]


def test_target_errors(params):
    with pytest.raises(UserError, match="no LoRA targets match"):
        lora.init_lora(params, "attn/qq_proj", 4, jax.random.key(1))
    with pytest.raises(UserError, match="unknown LoRA target"):
        lora.init_lora(params, "q_proj,foo_proj", 4, jax.random.key(1))
    with pytest.raises(UserError, match="no kernel under layers"):
        lora.init_lora(params, "layers/input_norm", 4, jax.random.key(1))
    with pytest.raises(UserError, match="rank"):
        lora.init_lora(params, "q_proj", 0, jax.random.key(1))


def test_b_zero_equals_base(params):
    ad = lora.init_lora(params, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 4,
                        jax.random.key(1))
    base = fwd(params)
    merged = fwd(lora.merge(params, ad, 8.0, 4))
    unmerged = lfwd(params, ad)
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(base))
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(base), atol=1e-6)


def test_unmerged_equals_merged_and_formula(params):
    ad = _nonzero(lora.init_lora(params, "q_proj,v_proj,down_proj", 4, jax.random.key(1)))
    s = 8.0 / 4
    merged = lora.merge(params, ad, 8.0, 4)
    a, b = ad["layers"]["mlp"]["down_proj"]["lora_a"], ad["layers"]["mlp"]["down_proj"]["lora_b"]
    want = params["layers"]["mlp"]["down_proj"]["kernel"] + s * np.einsum("lir,lro->lio", a, b)
    np.testing.assert_allclose(np.asarray(merged["layers"]["mlp"]["down_proj"]["kernel"]), want,
                               rtol=1e-5, atol=1e-6)
    # untouched leaves are the base's
    np.testing.assert_array_equal(np.asarray(merged["layers"]["attn"]["k_proj"]["kernel"]),
                                  np.asarray(params["layers"]["attn"]["k_proj"]["kernel"]))
    lm = fwd(merged)
    lu = lfwd(params, ad)
    lr = lfwd(params, ad, remat=True)
    base = fwd(params)
    assert float(jnp.abs(lm - base).max()) > 1e-2           # the adapters do something
    np.testing.assert_allclose(np.asarray(lu), np.asarray(lm), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lr), np.asarray(lm), atol=2e-5)


def test_dropout_is_keyed(params):
    ad = _nonzero(lora.init_lora(params, "q_proj,v_proj", 4, jax.random.key(1)), scale=0.5)
    kw = dict(alpha=8.0, rank=4)
    ref = lfwd(params, ad)
    d1 = lfwd(params, ad, jax.random.key(3), dropout=0.5)
    d2 = lfwd(params, ad, jax.random.key(3), dropout=0.5)
    d3 = lfwd(params, ad, jax.random.key(4), dropout=0.5)
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert float(jnp.abs(d1 - ref).max()) > 1e-4 and float(jnp.abs(d1 - d3).max()) > 1e-4
    with pytest.raises(ValueError, match="needs a key"):
        lora.lora_forward(params, ad, CFG, TOK, MASK, dropout=0.5, **kw)


def test_gradients_reach_only_adapters(params):
    ad = lora.init_lora(params, "q_proj,v_proj", 4, jax.random.key(1))

    @jax.jit
    def loss(base, adapters):
        return lfwd(base, adapters).std()

    g_ad = jax.jit(jax.grad(loss, argnums=1))(params, ad)
    # at init (B = 0) only B moves: dA = s * x^T (dy B^T) = 0
    q = g_ad["layers"]["attn"]["q_proj"]
    assert float(jnp.abs(q["lora_b"]).max()) > 0 and float(jnp.abs(q["lora_a"]).max()) == 0
    # the adapters' structure is exactly the targets; the base only feeds them
    assert set(lora.adapted_kernels(g_ad)) == {"layers/attn/q_proj/kernel", "layers/attn/v_proj/kernel"}
    ad2 = _nonzero(ad)
    g2 = jax.jit(jax.grad(loss, argnums=1))(params, ad2)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(g2))
    # an optimizer on the adapters tree leaves every base leaf untouched (the trainer's setup)
    import optax
    opt = optax.adam(1e-2)
    st = opt.init(ad2)
    upd, _ = opt.update(g2, st, ad2)
    new = optax.apply_updates(ad2, upd)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(ad2)
    assert float(loss(params, new)) != float(loss(params, ad2))


def test_merge_with_update_mask(params):
    ad = _nonzero(lora.init_lora(params, "q_proj", 4, jax.random.key(1)))
    m = np.zeros((2, 32, 32), bool)
    m[:, :4, :] = True
    merged = lora.merge(params, ad, 8.0, 4, mask={"layers": {"attn": {"q_proj": {"kernel": m}}}})
    d = np.asarray(merged["layers"]["attn"]["q_proj"]["kernel"] - params["layers"]["attn"]["q_proj"]["kernel"])
    assert np.all(d[:, 4:, :] == 0) and np.abs(d[:, :4, :]).max() > 0


def test_merge_rejects_foreign_adapters(params):
    other = ModelConfig("llama", 64, 48, 64, 2, 4, 2, 8)
    shapes = jax.eval_shape(lambda: init_params(other, jax.random.key(0)))
    ad = lora.init_lora(shapes, "q_proj", 2, jax.random.key(1))
    with pytest.raises(UserError, match="another model"):
        lora.merge(params, ad, 4.0, 2)
