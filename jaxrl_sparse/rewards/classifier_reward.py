"""Sentiment reward from a sequence classifier: r(text) = logit_pos(text) - logit_neg(text).

The PPO seed scores "prompt prefix + response" with `lvwerra/distilbert-imdb` (labels NEGATIVE=0,
POSITIVE=1). Texts are tokenized by the model's own tokenizer (with [CLS] ... [SEP]), truncated to
the model's max length, right-padded, and grouped by length into buckets so that a handful of jitted
shapes (rows: powers of two up to `batch_size`; columns: powers of two from 16 up to the max length)
serve any batch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.models import classifier as clf

Label = Union[str, int, None]


def _bucket(n: int, cap: int, lo: int = 16) -> int:
    """Smallest power of two >= n (at least lo), clipped to cap."""
    b = lo
    while b < n:
        b *= 2
    return min(b, cap)


def reward_from_logits(logits, pos: int, neg: Optional[int]):
    """r [B] = logits[:, pos] - logits[:, neg]  (just logits[:, pos] when neg is None). logits [B, C]."""
    r = logits[:, pos]
    return r if neg is None else r - logits[:, neg]


class ClassifierReward:
    """Callable `texts -> float32 [B]` reward from a DistilBERT sequence classifier.

    Args:
      folder_or_id: HF folder (config.json + *.safetensors + tokenizer) or hub id (when online).
      pos_label, neg_label: label names (from config.json id2label, case-insensitive) or indices;
        `neg_label=None` gives the raw positive logit (TRL's sentiment notebooks use that).
      batch_size: rows per forward pass (the largest row bucket).
      max_length: truncation length in tokens (default and upper bound: the model's positions).
      dtype: matmul dtype, "float32" or "bfloat16".
      loaded: an already loaded `LoadedClassifier` (then `folder_or_id` is only a name).
    """

    def __init__(self, folder_or_id: str = "lvwerra/distilbert-imdb", pos_label: Label = "POSITIVE",
                 neg_label: Label = "NEGATIVE", *, batch_size: int = 32, max_length: Optional[int] = None,
                 dtype: str = "float32", loaded: Optional[clf.LoadedClassifier] = None):
        if batch_size < 1:
            raise UserError(f"reward batch_size must be >= 1 (got {batch_size})")
        self.model = loaded or clf.load_classifier(folder_or_id, dtype=dtype)
        cfg, tok = self.model.cfg, self.model.tokenizer
        if tok is None:
            raise UserError(f"classifier {folder_or_id!r} was loaded without a tokenizer")
        self.pos = cfg.label_index(pos_label)
        self.neg = None if neg_label is None else cfg.label_index(neg_label)
        if self.neg == self.pos:
            raise UserError(f"pos_label and neg_label are the same label ({pos_label!r}, {neg_label!r})")
        cap = cfg.max_position_embeddings
        tok_max = getattr(tok, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < cap:
            cap = tok_max
        if max_length is not None:
            if max_length < 2:
                raise UserError(f"reward max_length must be >= 2 (got {max_length})")
            cap = min(cap, max_length)
        self.max_length = cap
        self.batch_size = batch_size
        pad = tok.pad_token_id
        self.pad_id = cfg.pad_token_id if pad is None else pad

    # ------------------------------------------------------------------ batching
    def tokenize(self, texts: Sequence[str]):
        """Token id lists (with special tokens), each truncated to `max_length`."""
        if isinstance(texts, str):
            raise TypeError("ClassifierReward takes a list of texts, not one string")
        enc = self.model.tokenizer([t or "" for t in texts], truncation=True, max_length=self.max_length,
                                   add_special_tokens=True)
        return enc["input_ids"]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """All class logits float32 [B, num_labels], in the order of `texts`.

        One jitted forward (`classifier.classify`, compiled once per (rows, cols) bucket and shared
        by every instance with the same config); the label difference is taken on the host.
        """
        ids = self.tokenize(texts)
        n = len(ids)
        out = [None] * n
        order = sorted(range(n), key=lambda i: len(ids[i]))  # similar lengths share a bucket
        for start in range(0, n, self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = min(_bucket(len(chunk), self.batch_size, lo=1), self.batch_size)
            cols = _bucket(max(len(ids[i]) for i in chunk), self.max_length)
            tokens = np.full((rows, cols), self.pad_id, np.int32)
            mask = np.zeros((rows, cols), np.int32)
            mask[:, 0] = 1  # filler rows see one token, never an all-masked softmax
            for r, i in enumerate(chunk):
                tokens[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = 1
            res = np.asarray(clf.classify(self.model.params, self.model.cfg, jnp.asarray(tokens),
                                          jnp.asarray(mask)))
            for r, i in enumerate(chunk):
                out[i] = res[r]
        if n == 0:
            return np.zeros((0, self.model.cfg.num_labels), np.float32)
        return np.stack(out).astype(np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Rewards float32 [B] = logit(pos) - logit(neg) per text."""
        return reward_from_logits(self.logits(texts), self.pos, self.neg).astype(np.float32)

    def score_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Rewards of `prompt + response` texts (the seed scores the prompt prefix with the response)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self([p + r for p, r in zip(prompts, responses)])
