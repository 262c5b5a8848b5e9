"""GGUF files (llama.cpp) -> HF config dict + HF-named numpy state dict (dequantized; no torch).

What llama.cpp's converter changed, and what is undone here (as transformers' GGUF loader does):
- tensor names: `blk.N.attn_q.weight` etc. (table `_BLOCK_NAMES`), `token_embd`, `output_norm`, `output`;
- llama-arch Q/K rows are permuted from HF's rotate-half layout to interleaved-pair RoPE layout:
  per head the rows `[r0 .. r_{hd/2-1}, r_{hd/2} ..]` were reordered to `[r0, r_{hd/2}, r1, ...]`;
  `_unpermute_qk` is the inverse (`reshape(n, 2, hd/2) <- reshape(n, hd/2, 2)` swap);
- Gemma norm weights were stored as `1 + w` (HF stores `w` and computes `x * (1 + w)`): subtract 1;
- GPT-2 Conv1D weights were transposed to `[out, in]`: transpose back.
The config is built from the GGUF metadata keys (`<arch>.block_count`, ...), the same mapping
transformers uses, with the missing fields filled by the transformers config class defaults.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from jaxrl_sparse.errors import UserError

# GGUF architecture -> HF model_type
_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3": "gemma3_text", "gpt2": "gpt2"}

# GGUF metadata suffix (after "<arch>.") -> HF config key
_META = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "vocab_size": "vocab_size",
}
_GPT2_META = {"num_hidden_layers": "n_layer", "max_position_embeddings": "n_positions",
              "hidden_size": "n_embd", "num_attention_heads": "n_head", "intermediate_size": "n_inner"}
_TOKEN_META = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
               "padding_token_id": "pad_token_id"}

# GGUF block tensor (without "blk.N.") -> HF suffix inside a layer, per family kind
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
_GEMMA_BLOCK_NAMES = dict(_BLOCK_NAMES, ffn_norm="pre_feedforward_layernorm",
                          post_attention_norm="post_attention_layernorm",
                          post_ffw_norm="post_feedforward_layernorm",
                          attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")
_GPT2_BLOCK_NAMES = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                     "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_TRANSPOSED = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _open(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # a truncated or non-GGUF file
        raise UserError(f"cannot read GGUF file {path} ({type(e).__name__}: {e}); "
                        "re-download it or pass a HF folder") from None


def gguf_hf_config(reader) -> Dict[str, Any]:
    """HF config dict (with transformers' class defaults filled in) from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH:
        raise UserError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCH)}")
    hf: Dict[str, Any] = {"model_type": _ARCH[arch]}
    for suffix, key in _META.items():
        v = _field(reader, f"{arch}.{suffix}")
        if v is not None:
            hf[key] = v
    for suffix, key in _TOKEN_META.items():
        v = _field(reader, f"tokenizer.ggml.{suffix}")
        if v is not None:
            hf[key] = v
    if "vocab_size" not in hf:  # older files: the vocabulary is the token list
        hf["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    hf["tie_word_embeddings"] = "output.weight" not in names
    if arch == "llama" and "head_dim" not in hf:  # llama stores head_dim as the RoPE width
        hd = _field(reader, "llama.rope.dimension_count")
        if hd:
            hf["head_dim"] = hd
    if arch == "gpt2":
        hf = {_GPT2_META.get(k, k): v for k, v in hf.items()}
    from transformers import AutoConfig  # config classes only; no torch needed
    return AutoConfig.for_model(**hf).to_dict()


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: rows [n*hd] from pair-interleaved to rotate-half."""
    hd2 = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, hd2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(arch: str, gguf_name: str) -> Optional[str]:
    """HF tensor name of a GGUF tensor name (None when the tensor is not used)."""
    base, _, kind = gguf_name.rpartition(".")  # kind: weight | bias
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    if arch == "gpt2":
        top = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
               "output_norm": "transformer.ln_f", "output": "lm_head"}
    if base in top:
        return f"{top[base]}.{kind}"
    parts = base.split(".")
    if len(parts) != 3 or parts[0] != "blk":
        return None
    table = _GPT2_BLOCK_NAMES if arch == "gpt2" else (
        _GEMMA_BLOCK_NAMES if arch.startswith("gemma") else _BLOCK_NAMES)
    if parts[2] not in table:
        return None
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    return f"{prefix}.{parts[1]}.{table[parts[2]]}.{kind}"


def read_gguf(path: str, progress: bool = True) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(HF config dict, HF state dict of float32 numpy arrays) of a GGUF file."""
    import gguf
    from tqdm.auto import tqdm
    reader = _open(path)
    hf = gguf_hf_config(reader)
    arch = _field(reader, "general.architecture")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    n_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_heads
    state: Dict[str, np.ndarray] = {}
    skipped: List[str] = []
    for t in tqdm(reader.tensors, desc=f"dequantizing {os.path.basename(path)}", disable=not progress,
                  leave=False):
        name = _hf_name(arch, t.name)
        if name is None:
            skipped.append(t.name)
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UserError(f"GGUF tensor {t.name} uses quantization {t.tensor_type.name} that the gguf "
                            f"package cannot dequantize ({e}); use another quantization of the model") from None
        w = np.asarray(w, np.float32).reshape([int(d) for d in reversed(t.shape)])
        base = t.name.rsplit(".", 2)[-2] if t.name.startswith("blk.") else ""
        if arch == "llama" and base in ("attn_q", "attn_k"):
            w = _unpermute_qk(w, n_heads if base == "attn_q" else n_kv)
        if arch.startswith("gemma") and t.name.endswith("norm.weight"):
            w = w - 1.0
        if arch == "gpt2" and base in _GPT2_TRANSPOSED and t.name.endswith(".weight"):
            w = w.T
        state[name] = w
    if skipped:
        import logging
        logging.getLogger(__name__).info("GGUF tensors not used: %s", ", ".join(skipped[:8]))
    return hf, state


def read_gguf_cached(path: str, progress: bool = True) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """`read_gguf`, with the dequantized fp32 tensors cached as safetensors next to the tokenizer cache.

    Dequantizing the default model takes 5-30 s on a small CPU; the cached copy loads in about a
    second. Keyed like the tokenizer cache (the file's content; `tokenizer.store_cache_entry` keeps
    the entries within `$JAXRL_SPARSE_CACHE_GB`, default 4); a broken entry is rebuilt, and a read-only or full cache
    only costs speed.
    """
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from jaxrl_sparse.models.tokenizer import _gguf_cache_key, cached_entry, store_cache_entry
    key = _gguf_cache_key(path)
    entry = cached_entry("gguf_weights", key)
    cfg_file, st_file = os.path.join(entry, "config.json"), os.path.join(entry, "model.safetensors")
    if os.path.isfile(cfg_file) and os.path.isfile(st_file):
        try:
            with open(cfg_file) as f:
                return json.load(f), load_file(st_file)
        except Exception:  # noqa: BLE001 - a broken cache entry: rebuild it
            shutil.rmtree(entry, ignore_errors=True)
    hf, state = read_gguf(path, progress)

    def fill(folder):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf, f)
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(folder, "model.safetensors"))

    store_cache_entry("gguf_weights", key, fill)
    return hf, state
