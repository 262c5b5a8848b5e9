"""Data sources: local JSONL files, and IMDB / GSM8K through `datasets` when they are reachable.

Everything a user can get wrong raises `UserError` with one line naming the problem and the fix.
Hub datasets fail fast when the hub is unreachable: a 3 s probe of `HF_ENDPOINT` (unless
`HF_DATASETS_OFFLINE`/`HF_HUB_OFFLINE` is set, in which case only the local `datasets` cache is
used), instead of `datasets`' own retries.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Sequence

from jaxrl_sparse.errors import UserError

IMDB = "stanfordnlp/imdb"
GSM8K = "openai/gsm8k"
PROBE_TIMEOUT_S = 3.0
_FALLBACK_HINT = "use --prompts_file=FILE.jsonl or --data=generated"


def load_jsonl(path: str, fields: Sequence[str] = (), *, limit: Optional[int] = None
               ) -> List[Dict]:
    """Records of a JSON-lines file (one JSON object per line; blank lines skipped).

    fields: keys every record must have. limit: stop after this many records.
    Raises UserError naming the file and line for a missing file, bad JSON, a non-object line,
    or a missing field.
    """
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file (check the path)")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a .jsonl file")
    out: List[Dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                "each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got "
                                f"{type(rec).__name__}")
            missing = [k for k in fields if k not in rec]
            if missing:
                raise UserError(f"{path}:{lineno}: missing field(s) {missing}; each record "
                                f"needs {list(fields)}")
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise UserError(f"{path}: no records (the file is empty)")
    return out


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when `HF_ENDPOINT` (default https://huggingface.co) answers within `timeout` s."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # the server answered
    except Exception:  # DNS failure, refused, timeout, TLS error: unreachable
        return False


def _load_hub(name: str, config: Optional[str], split: str, limit: Optional[int]):
    what = f"dataset {name}" + (f" ({config})" if config else "")
    if not _offline() and not hub_reachable():
        raise UserError(f"{what} unreachable (no network?); {_FALLBACK_HINT}, or set "
                        "HF_DATASETS_OFFLINE=1 to read a local datasets cache")
    try:
        import datasets
        ds = datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is "the data is not available"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        mode = "offline and not in the local cache" if _offline() else "failed to load"
        raise UserError(f"{what} split {split!r} {mode} ({reason}); {_FALLBACK_HINT}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def load_imdb(split: str = "train", limit: Optional[int] = None) -> List[Dict]:
    """IMDB reviews `[{'text', 'label'}]` from the hub (`stanfordnlp/imdb`)."""
    return _load_hub(IMDB, None, split, limit)


def load_gsm8k(split: str = "train", limit: Optional[int] = None) -> List[Dict]:
    """GSM8K problems `[{'question', 'answer'}]` from the hub (`openai/gsm8k`, config 'main')."""
    return _load_hub(GSM8K, "main", split, limit)
