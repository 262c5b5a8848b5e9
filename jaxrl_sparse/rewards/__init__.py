"""Reward functions: math answers (`rewards.math`) and sentiment (`rewards.sentiment`)."""
from jaxrl_sparse.rewards.math import (  # noqa: F401
    answer_value, correctness_reward, exact_match_reward, exact_match_rewards, extract_answer,
    format_reward, math_reward, math_rewards, parse_number, repetition_penalty)
from jaxrl_sparse.rewards.sentiment import (  # noqa: F401
    SentimentReward, VaderReward, make_sentiment_reward)
