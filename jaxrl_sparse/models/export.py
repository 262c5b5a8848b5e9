"""Export our parameters as a HF folder that `transformers.AutoModelForCausalLM` loads.

Layout written (atomically: a temporary sibling folder renamed into place):
  config.json             `to_hf_config(cfg)`
  model.safetensors       or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  generation_config.json  bos/eos/pad ids
  tokenizer files         `tokenizer.save_pretrained` (when a tokenizer is given)
Tied embeddings are stored once (`embed_tokens` / `wte`), as transformers' own `save_pretrained`
does; transformers re-ties `lm_head` on load.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig, to_hf_config
from jaxrl_sparse.models.convert import params_to_hf


def _shards(state: Dict[str, np.ndarray], max_shard_bytes: int) -> List[Dict[str, np.ndarray]]:
    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in state.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    return shards


def _as_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes
        return np.ascontiguousarray(x.astype(ml_dtypes.bfloat16))
    return np.ascontiguousarray(x.astype(np.float32))


def export_hf(path: str, config: ModelConfig, params: Dict[str, Any], tokenizer=None, *,
              dtype: Optional[str] = None, max_shard_bytes: int = 4 << 30, overwrite: bool = True) -> str:
    """Writes a HF model folder at `path` (see module doc); returns `path`.

    dtype: storage dtype (float32 | bfloat16), default `config.param_dtype`.
    max_shard_bytes: larger models are split into shards with a `model.safetensors.index.json`.
    """
    import jax
    from safetensors.numpy import save_file

    dtype = dtype or config.param_dtype
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"export dtype {dtype!r} not supported; use float32 or bfloat16")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} exists; pass overwrite=True or another path")
    params = jax.device_get(params)
    state = params_to_hf(config, params)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: _as_storage(v, dtype) for k, v in state.items()}

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        hf_cfg = to_hf_config(config.replace(param_dtype=dtype))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(config, k) is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        shards = _shards(state, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = int(sum(x.nbytes for x in state.values()))
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
