"""Decoder configuration: one frozen dataclass with family switches, HF config.json mapping.

Families: gpt2 (GPT-2), llama (SmolLM2, Llama), qwen2 (Qwen2 / Qwen2.5), gemma2, gemma3 (text).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from jaxrl_sparse.errors import UserError

FAMILIES = ("gpt2", "llama", "qwen2", "gemma2", "gemma3")
HF_ARCH = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_MODEL_TYPE_TO_FAMILY = {
    "gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2",
    "gemma3_text": "gemma3", "gemma3": "gemma3",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a decoder-only LM. Every field is what the forward pass reads."""
    family: str                      # one of FAMILIES
    vocab_size: int
    hidden_size: int                 # D
    intermediate_size: int           # F (MLP width)
    num_layers: int                  # L
    num_heads: int                   # H (query heads)
    num_kv_heads: int                # K (key/value heads; K < H is GQA)
    head_dim: int                    # hd
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0      # RoPE base of global-attention layers
    rope_local_theta: Optional[float] = None  # Gemma 3: RoPE base of sliding layers
    rope_scaling_factor: float = 1.0  # 'linear' RoPE scaling (positions / factor) of global layers
    tie_embeddings: bool = True
    qkv_bias: bool = False           # Qwen2 and GPT-2
    sliding_window: Optional[int] = None  # window of the sliding layers (q - k < window)
    layer_types: Tuple[str, ...] = ()  # per layer: 'full_attention' | 'sliding_attention'
    attn_logit_softcap: Optional[float] = None   # Gemma 2
    final_logit_softcap: Optional[float] = None  # Gemma 2
    query_pre_attn_scalar: Optional[float] = None  # Gemma: softmax scale = this ** -0.5
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    param_dtype: str = "float32"     # storage dtype of parameters: float32 | bfloat16
    dtype: str = "float32"           # compute dtype of activations: float32 | bfloat16

    # ---- derived family switches (properties so the config stays a single source of truth)
    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def is_gemma(self) -> bool:
        return self.family in ("gemma2", "gemma3")

    @property
    def positional(self) -> str:
        return "learned" if self.is_gpt2 else "rope"

    @property
    def gated_mlp(self) -> bool:
        return not self.is_gpt2

    @property
    def norm_type(self) -> str:
        return "layernorm" if self.is_gpt2 else "rmsnorm"

    @property
    def post_norms(self) -> bool:
        return self.is_gemma

    @property
    def qk_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def activation(self) -> str:
        return "gelu_tanh" if (self.is_gpt2 or self.is_gemma) else "silu"

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.head_dim) ** -0.5

    @property
    def sliding_layers(self) -> Tuple[bool, ...]:
        if not self.layer_types:
            return (False,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "ModelConfig":
        if self.family not in FAMILIES:
            raise UserError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise UserError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for d in (self.param_dtype, self.dtype):
            if d not in ("float32", "bfloat16"):
                raise UserError(f"dtype {d!r} not supported; use float32 or bfloat16")
        return self


def _gemma3_layer_types(n: int, pattern: int = 6) -> Tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n))


def _rope_params(hf: Dict[str, Any]) -> Tuple[float, Optional[float], float]:
    """(global theta, local theta, linear factor) from either transformers v4 or v5 config keys."""
    rp = hf.get("rope_parameters")
    local = hf.get("rope_local_base_freq")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta", 10000.0)
    if isinstance(rp, dict):
        if "full_attention" in rp:  # Gemma 3 in transformers v5
            full, slide = rp["full_attention"], rp.get("sliding_attention", {})
            theta = full.get("rope_theta", theta)
            local = slide.get("rope_theta", local)
            scaling = full
        else:
            theta = rp.get("rope_theta", theta)
            scaling = rp
    factor = 1.0
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            factor = float(scaling.get("factor", 1.0))
        elif kind not in ("default", None):
            raise UserError(f"RoPE scaling type {kind!r} is not supported (supported: default, linear)")
    return float(theta), (float(local) if local is not None else None), factor


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def from_hf_config(hf: Dict[str, Any], **overrides) -> ModelConfig:
    """Maps a HF `config.json` dict to a ModelConfig (raises UserError for unsupported ones)."""
    mt = hf.get("model_type")
    if mt == "gemma3" and "text_config" in hf:
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        mt = "gemma3_text"
    fam = _MODEL_TYPE_TO_FAMILY.get(mt)
    if fam is None:
        raise UserError(
            f"unsupported architecture model_type={mt!r}; supported: gpt2, llama, qwen2, gemma2, gemma3_text")
    if fam == "gpt2":
        d = hf["n_embd"]
        h = hf["n_head"]
        cfg = ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], hidden_size=d,
            intermediate_size=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"], num_heads=h,
            num_kv_heads=h, head_dim=d // h, max_position_embeddings=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=True, qkv_bias=True,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation {hf.get('activation_function')!r} not supported")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UserError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        return cfg.replace(**overrides).validate()
    theta, local, factor = _rope_params(hf)
    h = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // h
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    want = "silu" if fam in ("llama", "qwen2") else "gelu_pytorch_tanh"
    if act not in (want, "gelu_pytorch_tanh" if fam.startswith("gemma") else want):
        raise UserError(f"activation {act!r} is not supported for {fam} (expected {want})")
    layer_types = tuple(hf.get("layer_types") or ())
    sliding = hf.get("sliding_window")
    if fam == "gemma2" and not layer_types:
        layer_types = tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                            for i in range(hf["num_hidden_layers"]))
    if fam == "gemma3" and not layer_types:
        layer_types = _gemma3_layer_types(hf["num_hidden_layers"],
                                          hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
    if fam == "qwen2" and not hf.get("use_sliding_window", False):
        sliding, layer_types = None, ()
    if fam == "llama" and hf.get("mlp_bias"):
        raise UserError("Llama models with mlp_bias=True are not supported")
    if fam == "llama" and hf.get("attention_bias"):
        raise UserError("Llama models with attention_bias=True are not supported")
    cfg = ModelConfig(
        family=fam, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=h,
        num_kv_heads=hf.get("num_key_value_heads") or h, head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_local_theta=local if fam == "gemma3" else None, rope_scaling_factor=factor,
        tie_embeddings=bool(hf.get("tie_word_embeddings", fam != "llama")),
        qkv_bias=(fam == "qwen2"), sliding_window=sliding if layer_types else None,
        layer_types=layer_types if sliding else (),
        attn_logit_softcap=hf.get("attn_logit_softcapping") if fam.startswith("gemma") else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if fam.startswith("gemma") else None,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if fam.startswith("gemma") else None,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"))
    return cfg.replace(**overrides).validate()


def to_hf_config(cfg: ModelConfig) -> Dict[str, Any]:
    """HF `config.json` dict that transformers loads into the equivalent architecture."""
    common = dict(architectures=[HF_ARCH[cfg.family]], vocab_size=cfg.vocab_size,
                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                  pad_token_id=cfg.pad_token_id, tie_word_embeddings=cfg.tie_embeddings,
                  torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
    if cfg.is_gpt2:
        return dict(common, model_type="gpt2", n_embd=cfg.hidden_size, n_head=cfg.num_heads,
                    n_layer=cfg.num_layers, n_positions=cfg.max_position_embeddings,
                    n_ctx=cfg.max_position_embeddings, n_inner=cfg.intermediate_size,
                    layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    out = dict(common, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
               rope_theta=cfg.rope_theta, attention_dropout=0.0)
    scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor} if cfg.rope_scaling_factor != 1.0 else None
    if cfg.family == "llama":
        out.update(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False,
                   rope_scaling=scaling)
    elif cfg.family == "qwen2":
        out.update(model_type="qwen2", hidden_act="silu", use_sliding_window=False,
                   sliding_window=None, rope_scaling=scaling)
    else:
        out.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                   query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
                   layer_types=list(cfg.layer_types), attention_bias=False,
                   attn_logit_softcapping=cfg.attn_logit_softcap,
                   final_logit_softcapping=cfg.final_logit_softcap)
        if cfg.family == "gemma2":
            out.update(model_type="gemma2")
        else:
            out.update(model_type="gemma3_text", rope_local_base_freq=cfg.rope_local_theta,
                       rope_scaling=scaling)
    return out


# Real shapes of the registry's models (for benchmarks with random weights and eval_shape checks).
PRESETS: Dict[str, ModelConfig] = {
    "gpt2": ModelConfig("gpt2", 50257, 768, 3072, 12, 12, 12, 64, 1024, 1e-5, qkv_bias=True,
                        bos_token_id=50256, eos_token_id=50256),
    "gpt2-medium": ModelConfig("gpt2", 50257, 1024, 4096, 24, 16, 16, 64, 1024, 1e-5, qkv_bias=True,
                               bos_token_id=50256, eos_token_id=50256),
    "smollm2-135m": ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 8192, 1e-5, 100000.0,
                                bos_token_id=1, eos_token_id=2),
    "smollm2-360m": ModelConfig("llama", 49152, 960, 2560, 32, 15, 5, 64, 8192, 1e-5, 100000.0,
                                bos_token_id=1, eos_token_id=2),
    "smollm2-1.7b": ModelConfig("llama", 49152, 2048, 8192, 24, 32, 32, 64, 8192, 1e-5, 130000.0,
                                bos_token_id=1, eos_token_id=2),
    "qwen2.5-0.5b": ModelConfig("qwen2", 151936, 896, 4864, 24, 14, 2, 64, 32768, 1e-6, 1e6,
                                qkv_bias=True, eos_token_id=151643),
    "qwen2.5-1.5b": ModelConfig("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, 32768, 1e-6, 1e6,
                                qkv_bias=True, eos_token_id=151643),
    "qwen2.5-3b": ModelConfig("qwen2", 151936, 2048, 11008, 36, 16, 2, 128, 32768, 1e-6, 1e6,
                              qkv_bias=True, eos_token_id=151643),
    "qwen2.5-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 32768, 1e-6, 1e6,
                              tie_embeddings=False, qkv_bias=True, eos_token_id=151643),
    "gemma-2-2b": ModelConfig("gemma2", 256000, 2304, 9216, 26, 8, 4, 256, 8192, 1e-6,
                              sliding_window=4096,
                              layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(26)),
                              attn_logit_softcap=50.0, final_logit_softcap=30.0,
                              query_pre_attn_scalar=256, bos_token_id=2, eos_token_id=1,
                              pad_token_id=0),
    "gemma-3-270m": ModelConfig("gemma3", 262144, 640, 2048, 18, 4, 1, 256, 32768, 1e-6, 1e6,
                                rope_local_theta=10000.0, sliding_window=512,
                                layer_types=_gemma3_layer_types(18), query_pre_attn_scalar=256,
                                bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma-3-1b": ModelConfig("gemma3", 262144, 1152, 6912, 26, 4, 1, 256, 32768, 1e-6, 1e6,
                              rope_local_theta=10000.0, sliding_window=512,
                              layer_types=_gemma3_layer_types(26), query_pre_attn_scalar=256,
                              bos_token_id=2, eos_token_id=1, pad_token_id=0),
}


def preset(name: str, **overrides) -> ModelConfig:
    """Real-shape config of a registry model name (no weights)."""
    key = name.lower().split("/")[-1].replace("-instruct", "").replace("-it", "")
    key = {"smollm2-135m": "smollm2-135m", "qwen2.5-1.5b": "qwen2.5-1.5b"}.get(key, key)
    if key not in PRESETS:
        raise UserError(f"unknown model shape {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[key].replace(**overrides).validate()
