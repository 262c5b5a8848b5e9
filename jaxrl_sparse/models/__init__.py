"""Decoder LMs: config, Flax decoder, weights from HF folders / GGUF / hub, tokenizers, export.

    lm = load_model("smollm2-135m-instruct")          # LoadedModel(config, params, tokenizer, source)
    out = forward(lm.params, lm.config, tokens, mask)  # DecoderOutput(logits, hidden, cache)
    export_hf("out/my-model", lm.config, lm.params, lm.tokenizer)
"""
from jaxrl_sparse.models.config import FAMILIES, PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from jaxrl_sparse.models.convert import hf_name_of, hf_to_params, params_to_hf
from jaxrl_sparse.models.decoder import DecoderOutput, forward, init_params
from jaxrl_sparse.models.export import export_hf
from jaxrl_sparse.models.hub import (DEFAULT_MODEL, REGISTRY, LoadedModel, load_model, load_tokenizer,
                                     model_shape, resolve)


def load_params(name_or_path: str, **kw):
    """(params, config) without a tokenizer; same sources and keywords as `load_model`."""
    lm = load_model(name_or_path, with_tokenizer=False, **kw)
    return lm.params, lm.config


__all__ = [
    "FAMILIES", "PRESETS", "ModelConfig", "from_hf_config", "preset", "to_hf_config", "hf_name_of",
    "hf_to_params", "params_to_hf", "DecoderOutput", "forward", "init_params", "export_hf",
    "DEFAULT_MODEL", "REGISTRY", "LoadedModel", "load_model", "load_tokenizer", "load_params",
    "model_shape", "resolve",
]
