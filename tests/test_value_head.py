"""Value head (TRL AutoModelForCausalLMWithValueHead semantics) on the decoder's hidden states."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_sparse.models import config as mcfg
from jaxrl_sparse.models import convert, decoder
from jaxrl_sparse.models import value_head as vh

FWD = jax.jit(decoder.forward, static_argnums=1)  # one compile per shape, shared by the tests
PWV = jax.jit(vh.policy_with_value, static_argnums=1)


@pytest.fixture(scope="module")
def gpt2():
    """Tiny random HF GPT-2, its config and our params, and a joint {'model', 'value_head'} tree."""
    from hf_ref import random_hf_model, state_numpy
    model = random_hf_model("gpt2")
    cfg = mcfg.from_hf_config(model.config.to_dict())
    params = {"model": jax.tree_util.tree_map(jnp.asarray, convert.hf_to_params(cfg, state_numpy(model))),
              "value_head": vh.init_value_head(cfg.hidden_size, jax.random.PRNGKey(3))}
    return model, cfg, params


def test_values_are_head_on_hf_last_hidden_state(gpt2):
    """TRL feeds `hidden_states[-1]` (after ln_f in HF GPT-2) to the head: values = h W + b."""
    import torch
    model, cfg, params = gpt2
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)).astype(np.int32)
    mask = np.ones_like(tokens)
    logits, values = PWV(params, cfg, tokens, mask)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), output_hidden_states=True)
    h = out.hidden_states[-1].numpy()  # [B, T, D], after ln_f
    W, b = np.asarray(params["value_head"]["kernel"]), np.asarray(params["value_head"]["bias"])
    want = (h @ W + b)[..., 0]
    assert values.shape == (2, 7) and values.dtype == jnp.float32
    assert np.abs(want).max() > 0.05
    np.testing.assert_allclose(np.asarray(values), want, atol=2e-4 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=2e-4 * np.abs(out.logits.numpy()).max())
    # and exactly the head on our own decoder hidden states
    hid = np.asarray(FWD(params["model"], cfg, tokens, mask).hidden)
    np.testing.assert_allclose(np.asarray(values), (hid @ W + b)[..., 0], rtol=1e-5, atol=1e-5)


def test_dropout_only_with_rng():
    apply = jax.jit(vh.value_head_apply, static_argnames="dropout_prob")
    head = vh.init_value_head(16, jax.random.PRNGKey(0))
    h = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    plain = (np.asarray(h) @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))[..., 0]
    np.testing.assert_allclose(np.asarray(apply(head, h)), plain, rtol=1e-5, atol=1e-6)
    drop = np.asarray(apply(head, h, dropout_prob=0.5, dropout_rng=jax.random.PRNGKey(2)))
    assert np.abs(drop - plain).max() > 1e-3
    same = apply(head, h, dropout_prob=0.0, dropout_rng=jax.random.PRNGKey(2))
    np.testing.assert_allclose(np.asarray(same), plain, rtol=1e-5, atol=1e-6)
    # one unit kept with scale 1/(1-p): dropout(h) W + b with h = e_j, W = 1 -> 0 or 2 (+ b)
    one = {"kernel": jnp.ones((16, 1)), "bias": jnp.zeros((1,))}
    e = jnp.zeros((1, 64, 16)).at[..., 3].set(1.0)
    v = np.asarray(apply(one, e, dropout_prob=0.5, dropout_rng=jax.random.PRNGKey(4)))
    assert set(np.unique(v).tolist()) <= {0.0, 2.0} and 0 < (v == 2.0).sum() < v.size


def test_gradient_reaches_trunk_and_head(gpt2):
    _, cfg, params = gpt2
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], np.int32)

    def loss(p):
        logits, values = vh.policy_with_value(p, cfg, tokens, mask)
        return jnp.sum(values * mask) + 0.1 * jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    g = jax.jit(jax.grad(loss))(params)
    # d/dW sum_t m_t (h_t W + b) = sum_t m_t h_t ; d/db = sum_t m_t
    hid = np.asarray(FWD(params["model"], cfg, tokens, mask).hidden)
    np.testing.assert_allclose(np.asarray(g["value_head"]["kernel"])[:, 0],
                               (hid * mask[..., None]).sum((0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g["value_head"]["bias"]), [mask.sum()], rtol=1e-6)
    for path in (("layers", "attn", "q_proj", "kernel"), ("layers", "mlp", "down_proj", "kernel"),
                 ("embed", "embedding"), ("final_norm", "scale")):
        leaf = g["model"]
        for k in path:
            leaf = leaf[k]
        assert np.isfinite(leaf).all() and np.abs(leaf).max() > 1e-6, path


def test_init_strategies():
    D = 256
    w = vh.init_value_head(D, jax.random.PRNGKey(0))
    bound = 1 / np.sqrt(D)
    assert w["kernel"].shape == (D, 1) and w["bias"].shape == (1,)
    assert np.abs(w["kernel"]).max() <= bound and np.abs(w["kernel"]).max() > 0.9 * bound
    n = vh.init_value_head(D, jax.random.PRNGKey(0), "normal", std=0.2)
    assert float(n["bias"][0]) == 0.0 and 0.17 < float(jnp.std(n["kernel"])) < 0.23
    with pytest.raises(ValueError, match="strategy"):
        vh.init_value_head(D, jax.random.PRNGKey(0), "xavier")
    cfg = mcfg.from_hf_config(
        {"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 16})
    joint = jax.eval_shape(lambda k: vh.init_policy_with_value(cfg, k), jax.random.PRNGKey(1))
    assert set(joint) == {"model", "value_head"} and joint["value_head"]["kernel"].shape == (16, 1)
