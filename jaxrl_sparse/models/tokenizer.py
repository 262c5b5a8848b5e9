"""Tokenizers from a HF folder or a GGUF file, prepared the way the rest of the library expects.

`prepare_tokenizer` sets `padding_side='left'` (generation and scoring batch left-padded rows)
and makes sure a pad token exists (the EOS token when the tokenizer has none). Tokenizers are
never loaded with `trust_remote_code`.

A GGUF tokenizer takes transformers several seconds to rebuild from the file's vocabulary, so
the rebuilt tokenizer is cached as a HF tokenizer folder under `cache_dir()` keyed by the file's
path, size and mtime (written atomically; delete the folder to force a rebuild).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Optional

from jaxrl_sparse.errors import UserError


def cache_dir() -> str:
    """`$JAXRL_SPARSE_CACHE`, else `~/.cache/jaxrl_sparse`."""
    return os.environ.get("JAXRL_SPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxrl_sparse")


def prepare_tokenizer(tok):
    """Left padding and a pad token (EOS when missing); returns the same tokenizer."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError("the tokenizer has neither a pad nor an EOS token; add one to tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()


def tokenizer_from_folder(folder: str):
    """`AutoTokenizer.from_pretrained(folder)` (local files only), prepared."""
    from transformers import AutoTokenizer
    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {folder} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "the folder needs tokenizer.json or tokenizer_config.json + vocabulary files") from None
    return prepare_tokenizer(tok)


def _gguf_cache_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def tokenizer_from_gguf(path: str, use_cache: bool = True):
    """Tokenizer stored in a GGUF file (vocabulary, merges, chat template), prepared."""
    from transformers import AutoTokenizer
    _quiet_transformers()
    cached = os.path.join(cache_dir(), "tokenizers", _gguf_cache_key(path))
    if use_cache and os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        try:
            return tokenizer_from_folder(cached)
        except UserError:
            shutil.rmtree(cached, ignore_errors=True)  # a broken cache entry: rebuild it
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                            gguf_file=os.path.basename(path), local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot build a tokenizer from GGUF file {path} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if use_cache:
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cached))
            tok.save_pretrained(tmp)
            os.replace(tmp, cached) if not os.path.exists(cached) else shutil.rmtree(tmp)
        except OSError:
            pass  # a read-only cache only costs speed
    return prepare_tokenizer(tok)
