"""Tokenizers from a HF folder or a GGUF file, prepared the way the rest of the library expects.

`prepare_tokenizer` sets `padding_side='left'` (generation and scoring batch left-padded rows)
and makes sure a pad token exists (the EOS token when the tokenizer has none). Tokenizers are
never loaded with `trust_remote_code`.

A GGUF tokenizer takes transformers several seconds to rebuild from the file's vocabulary, so
the rebuilt tokenizer is cached as a HF tokenizer folder under `cache_dir()` keyed by the file's
content (written atomically; delete the folder to force a rebuild). `store_cache_entry` is the
shared writer of both GGUF caches (this one and `gguf_io`'s dequantized weights): it never leaves a
partial entry behind and keeps each kind within `$JAXRL_SPARSE_CACHE_GB` (default 4; least recently
used entries go first).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from typing import Callable

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


def cache_budget_bytes() -> int:
    """`$JAXRL_SPARSE_CACHE_GB` (default 4) per kind of entry; the newest entry is kept whatever its size."""
    return int(float(os.environ.get("JAXRL_SPARSE_CACHE_GB") or 4) * (1 << 30))


def _gguf_cache_key(path: str) -> str:
    """Hash of the file's bytes: a copy of the same file anywhere (another checkout's venv, a
    moved download) hits the same entry, and an edited file never hits a stale one."""
    st = os.stat(path)
    return _content_key(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _content_key(path: str, size: int, mtime_ns: int) -> str:  # memoised per (path, size, mtime)
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_entry(kind: str, key: str) -> str:
    """`cache_dir()/kind/key`; when it exists its mtime is refreshed (it counts as recently used)."""
    entry = os.path.join(cache_dir(), kind, key)
    if os.path.isdir(entry):
        try:
            os.utime(entry)
        except OSError:
            pass
    return entry


def store_cache_entry(kind: str, key: str, fill: Callable[[str], None]) -> None:
    """Writes a cache entry atomically: `fill(folder)` writes into a fresh folder that is renamed to
    `cache_dir()/kind/key`. A failure (read-only cache, full disk) removes the partial folder and
    only costs speed. Afterwards the least recently used entries of `kind` beyond
    `cache_budget_bytes()` are removed."""
    parent = os.path.join(cache_dir(), kind)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        fill(tmp)
        if os.path.exists(os.path.join(parent, key)):
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, os.path.join(parent, key))
        tmp = None
    except Exception as e:  # noqa: BLE001 - e.g. safetensors' own error on a full disk
        import logging
        logging.getLogger(__name__).warning("not cached (%s: %s); the next load rebuilds it",
                                            type(e).__name__, str(e)[:200])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _prune(parent, cache_budget_bytes())


def _prune(parent: str, budget: int) -> None:
    def size(d):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    try:
        entries = [os.path.join(parent, n) for n in os.listdir(parent) if not n.startswith(".")]
        entries.sort(key=os.path.getmtime, reverse=True)
        total = 0
        for i, entry in enumerate(entries):
            total += size(entry)
            if i and total > budget:
                shutil.rmtree(entry, ignore_errors=True)
    except OSError:
        return


def tokenizer_from_gguf(path: str, use_cache: bool = True):
    """Tokenizer stored in a GGUF file (vocabulary, merges, chat template), prepared."""
    from transformers import AutoTokenizer
    _quiet_transformers()
    key = _gguf_cache_key(path)
    cached = cached_entry("tokenizers", key)
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
        store_cache_entry("tokenizers", key, tok.save_pretrained)
    return prepare_tokenizer(tok)
