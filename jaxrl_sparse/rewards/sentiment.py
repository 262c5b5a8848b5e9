"""Sentiment rewards: a callable `texts -> scores [B]` (higher = more positive).

`VaderReward` (the offline default) is the VADER compound score in [-1, 1]: a lexicon and rules
shipped inside the `vaderSentiment` package, no download. The DistilBERT-IMDB classifier used by
the PPO seed lives in `jaxrl_sparse.models.classifier`; `make_sentiment_reward` picks one by name.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from jaxrl_sparse.errors import UserError


class SentimentReward(Protocol):
    """Scores a batch of texts: `__call__(texts) -> float32 [B]`, higher = more positive."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        ...


class VaderReward:
    """VADER compound polarity in [-1, 1] per text (float32 `[B]`)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("VaderReward takes a list of texts, not one string")
        return np.asarray([self._analyzer.polarity_scores(t or "")["compound"] for t in texts],
                          np.float32)


def make_sentiment_reward(name_or_path: str = "vader", **kwargs) -> SentimentReward:
    """`'vader'` -> VaderReward; anything else is a sentiment-classifier checkpoint (a HF id or a
    local folder such as `lvwerra/distilbert-imdb`) served by `jaxrl_sparse.models.classifier`;
    `kwargs` go to that loader."""
    if name_or_path.lower() == "vader":
        if kwargs:
            raise UserError(f"the vader reward takes no options (got {sorted(kwargs)})")
        return VaderReward()
    try:
        from jaxrl_sparse.models import classifier
    except ImportError as e:  # the classifier module is optional at import time
        raise UserError(f"sentiment model {name_or_path!r} needs jaxrl_sparse.models.classifier "
                        f"({e}); use --reward_model=vader") from e
    return classifier.make_sentiment_reward(name_or_path, **kwargs)
