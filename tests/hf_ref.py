"""Tiny random HF configs of every family, and helpers to compare our logits with transformers'."""
from __future__ import annotations

import importlib.metadata as md

import numpy as np

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_hf_config(family: str):
    """A small transformers config of `family` exercising its special features."""
    import transformers as tf
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    if family == "llama":
        return tf.LlamaConfig(**TINY, rope_theta=100000.0, tie_word_embeddings=True)
    if family == "llama_untied":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True)
    if family == "gemma2":
        return tf.Gemma2Config(**dict(TINY, num_hidden_layers=4), head_dim=32, query_pre_attn_scalar=24,
                               sliding_window=3, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**dict(TINY, num_hidden_layers=6), head_dim=32, query_pre_attn_scalar=24,
                                   sliding_window=3, rope_theta=1e6, rope_local_base_freq=10000.0,
                                   layer_types=["sliding_attention"] * 5 + ["full_attention"])
    raise ValueError(family)


def random_hf_model(family: str, seed: int = 0):
    """An HF model with random weights of every tensor (norm weights too, so offsets matter)."""
    import torch
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def state_numpy(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits with explicit positions from the mask (left padding)."""
    import torch
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def have_dist(dist: str) -> bool:
    """True when the distribution (a pip package) is installed."""
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False
