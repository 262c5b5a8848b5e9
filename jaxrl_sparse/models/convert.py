"""HF state-dict names <-> our parameter tree (numpy in, numpy out; no torch).

`hf_to_params` stacks per-layer HF tensors on the layer axis and transposes `nn.Linear`
weights to `[in, out]`; GPT-2's fused `c_attn` is split into q/k/v. `params_to_hf` is its
inverse, used by export. Both raise UserError naming the first missing tensor.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig

# (our path inside params['layers'], HF name suffix inside a block, is a Linear weight to transpose)
_LLAMA_BLOCK = [
    ("input_norm/scale", "input_layernorm.weight", False),
    ("attn/q_proj/kernel", "self_attn.q_proj.weight", True),
    ("attn/k_proj/kernel", "self_attn.k_proj.weight", True),
    ("attn/v_proj/kernel", "self_attn.v_proj.weight", True),
    ("attn/o_proj/kernel", "self_attn.o_proj.weight", True),
    ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", True),
    ("mlp/up_proj/kernel", "mlp.up_proj.weight", True),
    ("mlp/down_proj/kernel", "mlp.down_proj.weight", True),
]
_QKV_BIAS = [
    ("attn/q_proj/bias", "self_attn.q_proj.bias", False),
    ("attn/k_proj/bias", "self_attn.k_proj.bias", False),
    ("attn/v_proj/bias", "self_attn.v_proj.bias", False),
]
_GEMMA_NORMS = [
    ("post_attn_norm/scale", "post_attention_layernorm.weight", False),
    ("pre_mlp_norm/scale", "pre_feedforward_layernorm.weight", False),
    ("post_mlp_norm/scale", "post_feedforward_layernorm.weight", False),
]
_GPT2_BLOCK = [
    ("input_norm/scale", "ln_1.weight", False),
    ("input_norm/bias", "ln_1.bias", False),
    ("attn/o_proj/kernel", "attn.c_proj.weight", False),  # Conv1D is already [in, out]
    ("attn/o_proj/bias", "attn.c_proj.bias", False),
    ("pre_mlp_norm/scale", "ln_2.weight", False),
    ("pre_mlp_norm/bias", "ln_2.bias", False),
    ("mlp/up_proj/kernel", "mlp.c_fc.weight", False),
    ("mlp/up_proj/bias", "mlp.c_fc.bias", False),
    ("mlp/down_proj/kernel", "mlp.c_proj.weight", False),
    ("mlp/down_proj/bias", "mlp.c_proj.bias", False),
]


def block_table(cfg: ModelConfig) -> List[Tuple[str, str, bool]]:
    """Per-layer (our path, HF suffix, transpose) rows for this family."""
    if cfg.is_gpt2:
        return list(_GPT2_BLOCK)
    rows = list(_LLAMA_BLOCK)
    if cfg.qkv_bias:
        rows += _QKV_BIAS
    if cfg.is_gemma:
        rows += _GEMMA_NORMS
    else:
        rows.append(("pre_mlp_norm/scale", "post_attention_layernorm.weight", False))
    if cfg.qk_norm:
        rows += [("attn/q_norm/scale", "self_attn.q_norm.weight", False),
                 ("attn/k_norm/scale", "self_attn.k_norm.weight", False)]
    return rows


def top_table(cfg: ModelConfig) -> List[Tuple[str, str, bool]]:
    """Non-layer (our path, HF name, transpose) rows."""
    if cfg.is_gpt2:
        return [("embed/embedding", "transformer.wte.weight", False),
                ("pos_embed/embedding", "transformer.wpe.weight", False),
                ("final_norm/scale", "transformer.ln_f.weight", False),
                ("final_norm/bias", "transformer.ln_f.bias", False)]
    rows = [("embed/embedding", "model.embed_tokens.weight", False),
            ("final_norm/scale", "model.norm.weight", False)]
    if not cfg.tie_embeddings:
        rows.append(("lm_head/kernel", "lm_head.weight", True))
    return rows


def layer_prefix(cfg: ModelConfig, i: int) -> str:
    return f"transformer.h.{i}." if cfg.is_gpt2 else f"model.layers.{i}."


def _set(tree: Dict, path: str, value) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: Dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _strip_prefix(state: Dict[str, np.ndarray], cfg: ModelConfig) -> Dict[str, np.ndarray]:
    """Accepts GPT-2 checkpoints saved without the `transformer.` prefix (the hub's gpt2 files)."""
    if cfg.is_gpt2 and "transformer.wte.weight" not in state and "wte.weight" in state:
        return {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in state.items()}
    return state


def hf_to_params(cfg: ModelConfig, state: Dict[str, np.ndarray], dtype=None) -> Dict:
    """HF state dict (name -> array) to our stacked parameter tree of numpy arrays."""
    state = _strip_prefix(state, cfg)
    dtype = dtype or (np.float32 if cfg.param_dtype == "float32" else None)

    def take(name: str, transpose: bool):
        if name not in state:
            raise UserError(f"weights are missing tensor {name!r} (partial or wrong checkpoint for a "
                            f"{cfg.family} model); re-download or point at the complete folder")
        x = np.asarray(state[name])
        x = x.T if transpose else x
        return _cast(x, cfg)

    params: Dict = {}
    for path, name, tr in top_table(cfg):
        _set(params, path, take(name, tr))
    for path, suffix, tr in block_table(cfg):
        _set(params, "layers/" + path,
             np.stack([take(layer_prefix(cfg, i) + suffix, tr) for i in range(cfg.num_layers)]))
    if cfg.is_gpt2:
        D = cfg.hidden_size
        w = np.stack([take(layer_prefix(cfg, i) + "attn.c_attn.weight", False) for i in range(cfg.num_layers)])
        b = np.stack([take(layer_prefix(cfg, i) + "attn.c_attn.bias", False) for i in range(cfg.num_layers)])
        for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
            _set(params, f"layers/attn/{n}/kernel", w[:, :, j * D:(j + 1) * D])
            _set(params, f"layers/attn/{n}/bias", b[:, j * D:(j + 1) * D])
    want = cfg.vocab_size
    got = params["embed"]["embedding"].shape[0]
    if got != want:
        raise UserError(f"embedding has {got} rows but config.json says vocab_size={want}; "
                        "the weights and config do not belong together")
    return params


def _cast(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if cfg.param_dtype == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(np.float32)


def params_to_hf(cfg: ModelConfig, params: Dict) -> Dict[str, np.ndarray]:
    """Our parameter tree -> HF state dict (numpy, contiguous), the inverse of hf_to_params."""
    out: Dict[str, np.ndarray] = {}

    def put(name, x, transpose):
        x = np.asarray(x)
        out[name] = np.ascontiguousarray(x.T if transpose else x)

    for path, name, tr in top_table(cfg):
        put(name, _get(params, path), tr)
    for path, suffix, tr in block_table(cfg):
        stacked = np.asarray(_get(params, "layers/" + path))
        for i in range(cfg.num_layers):
            put(layer_prefix(cfg, i) + suffix, stacked[i], tr)
    if cfg.is_gpt2:
        a = params["layers"]["attn"]
        w = np.concatenate([np.asarray(a[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")], axis=-1)
        b = np.concatenate([np.asarray(a[n]["bias"]) for n in ("q_proj", "k_proj", "v_proj")], axis=-1)
        for i in range(cfg.num_layers):
            put(layer_prefix(cfg, i) + "attn.c_attn.weight", w[i], False)
            put(layer_prefix(cfg, i) + "attn.c_attn.bias", b[i], False)
        put("lm_head.weight", _get(params, "embed/embedding"), False)
    return out


def hf_name_of(cfg: ModelConfig, path: str, layer: int | None = None) -> str:
    """HF-style name of one of our parameter paths (for `launch.weight_shapes` and reports)."""
    if path.startswith("layers/"):
        sub = path[len("layers/"):]
        for p, suffix, _ in block_table(cfg):
            if p == sub:
                return layer_prefix(cfg, "{i}" if layer is None else layer) + suffix
        if cfg.is_gpt2 and sub.startswith("attn/") and sub.split("/")[1] in ("q_proj", "k_proj", "v_proj"):
            part = sub.split("/")[1][0]
            return layer_prefix(cfg, "{i}" if layer is None else layer) + \
                f"attn.c_attn.{'weight' if sub.endswith('kernel') else 'bias'}[{part}]"
    for p, name, _ in top_table(cfg):
        if p == path:
            return name
    return path
