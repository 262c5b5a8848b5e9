"""PPO value head on the decoder's last hidden states (TRL 0.8.6 `AutoModelForCausalLMWithValueHead`).

TRL's head is `ValueHead`: Dropout(summary_dropout_prob, default 0.1) -> Linear(D, 1), applied to
`base_model_output.hidden_states[-1]` and squeezed to values [B, T]. In transformers, the last entry
of `hidden_states` is taken *after* the final norm (GPT-2 `ln_f`, Llama/Qwen/Gemma `norm`), which is
exactly our `DecoderOutput.hidden`, so

    values [B, T] = dropout(hidden) @ W + b,       W [D, 1], b [1]      (fp32)

Dropout is TRL's training-mode behaviour; here it is on only when a `dropout_rng` is passed (PPO
minibatch updates) and off for rollouts / evaluation.

Initialisation: TRL's default `v_head_init_strategy=None` leaves PyTorch's `nn.Linear` default, i.e.
W, b ~ U(-1/sqrt(D), 1/sqrt(D)); `strategy="normal"` is TRL's alternative, W ~ N(0, std^2)
(`v_head_initializer_range`, default 0.2) and b = 0. We default to the PyTorch/TRL default.

Joint parameters of policy + value: `{'model': decoder params, 'value_head': {'kernel': [D, 1], 'bias': [1]}}`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_sparse.models import decoder
from jaxrl_sparse.models.config import ModelConfig

DEFAULT_DROPOUT = 0.1  # TRL summary_dropout_prob


class ValueHead(nn.Module):
    """`__call__(hidden [B, T, D], deterministic) -> values [B, T]` fp32 (dropout needs rng 'dropout')."""
    summary_dropout_prob: float = DEFAULT_DROPOUT

    @nn.compact
    def __call__(self, hidden, deterministic: bool = True):
        h = hidden.astype(jnp.float32)  # TRL casts the hidden state to the head's dtype (fp32)
        if self.summary_dropout_prob > 0:
            h = nn.Dropout(self.summary_dropout_prob)(h, deterministic=deterministic)
        d = h.shape[-1]
        bound = 1.0 / math.sqrt(d)
        init = nn.initializers.uniform(2 * bound)
        v = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=lambda k, s, t: init(k, s, t) - bound,
                     bias_init=lambda k, s, t: init(k, s, t) - bound, name="summary")(h)
        return v[..., 0]


def init_value_head(hidden_size: int, key, strategy: str = "default", std: float = 0.2) -> Dict[str, Any]:
    """{'kernel': [D, 1], 'bias': [1]} fp32.

    strategy "default": PyTorch nn.Linear init (TRL's default), W, b ~ U(-1/sqrt(D), 1/sqrt(D)).
    strategy "normal":  TRL's `v_head_init_strategy="normal"`, W ~ N(0, std^2), b = 0.
    """
    if strategy == "default":
        kk, kb = jax.random.split(key)
        bound = 1.0 / math.sqrt(hidden_size)
        return {"kernel": jax.random.uniform(kk, (hidden_size, 1), jnp.float32, -bound, bound),
                "bias": jax.random.uniform(kb, (1,), jnp.float32, -bound, bound)}
    if strategy == "normal":
        return {"kernel": std * jax.random.normal(key, (hidden_size, 1), jnp.float32),
                "bias": jnp.zeros((1,), jnp.float32)}
    raise ValueError(f"unknown value-head init strategy {strategy!r} (default | normal)")


def value_head_apply(head_params, hidden, *, dropout_prob: float = DEFAULT_DROPOUT,
                     dropout_rng: Optional[jax.Array] = None):
    """values [B, T] fp32 = dropout(hidden [B, T, D]) @ kernel + bias; dropout only with dropout_rng."""
    module = ValueHead(dropout_prob)
    variables = {"params": {"summary": head_params}}
    if dropout_rng is None or dropout_prob <= 0:
        return module.apply(variables, hidden, True)
    return module.apply(variables, hidden, False, rngs={"dropout": dropout_rng})


def init_policy_with_value(cfg: ModelConfig, key, strategy: str = "default") -> Dict[str, Any]:
    """Random {'model': decoder params, 'value_head': head params} at the config's shapes."""
    k_model, k_head = jax.random.split(key)
    return {"model": decoder.init_params(cfg, k_model),
            "value_head": init_value_head(cfg.hidden_size, k_head, strategy)}


def policy_with_value(params, cfg: ModelConfig, tokens, attention_mask=None, *,
                      dropout_prob: float = DEFAULT_DROPOUT, dropout_rng: Optional[jax.Array] = None,
                      remat: bool = False, **forward_kwargs) -> Tuple[jax.Array, jax.Array]:
    """One decoder pass -> (logits [B, T, V] fp32, values [B, T] fp32).

    params = {'model': decoder params, 'value_head': {'kernel': [D, 1], 'bias': [1]}}; tokens [B, T];
    attention_mask [B, T] (1 = real). Extra keyword arguments (positions, noise, ...) go to
    `decoder.forward`. values[:, t] is the value of the state ending at token t.
    """
    out = decoder.forward(params["model"], cfg, tokens, attention_mask, remat=remat, **forward_kwargs)
    values = value_head_apply(params["value_head"], out.hidden, dropout_prob=dropout_prob,
                              dropout_rng=dropout_rng)
    return out.logits, values
