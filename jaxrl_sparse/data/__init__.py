"""Data: local JSONL, IMDB / GSM8K via `datasets`, and offline generators (reviews, word problems)."""
from jaxrl_sparse.data.math_problems import (  # noqa: F401
    Difficulty, generate_problem, generate_problems, generate_splits, gold_answer,
    train_test_split)
from jaxrl_sparse.data.reviews import (  # noqa: F401
    PROMPT_PREFIX, clean_review, generate_review_openings, ppo_prompt)
from jaxrl_sparse.data.sources import hub_reachable, load_gsm8k, load_imdb, load_jsonl  # noqa: F401
