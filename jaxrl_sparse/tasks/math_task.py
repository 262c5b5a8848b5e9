"""Math word-problem task: data splits, prompts (chat template), left-padded token arrays, rewards.

Shared by ES and GRPO. Problems are `{'question', 'answer'}` dicts (GSM8K's fields; the answer
ends with `#### n`). The reward is the ES seed's: 1.0 when the model's answer (`#### n`, else the
last number) equals the gold number.
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

import numpy as np

from jaxrl_sparse.errors import UserError

DEFAULT_SYSTEM = "You are a helpful assistant that solves math word problems."
INSTRUCTION = ("Solve the following math problem step by step. "
               "End your response with the final answer on its own line as '#### <number>'.")
DATA_SOURCES = ("gsm8k", "jsonl", "generated")


def build_math_prompts(tokenizer, questions: Sequence[str], chat: bool = True,
                       system: str = DEFAULT_SYSTEM, instruction: str = INSTRUCTION) -> List[str]:
    """Prompt strings: the chat template (system + user turn, generation prompt) when `chat` and
    the tokenizer has one, else `instruction\\n\\nQuestion: q\\nAnswer:`."""
    out = []
    use_chat = chat and getattr(tokenizer, "chat_template", None)
    for q in questions:
        if use_chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": f"{instruction}\n\n{q}"}]
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            out.append(f"{instruction}\n\nQuestion: {q}\nAnswer:")
    return out


def encode_left_padded(tokenizer, texts: Sequence[str], max_len: int, pad_id: int
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """tokens, mask [B, P] int32 with P = the longest prompt (<= max_len), left-padded; prompts
    longer than `max_len` keep their last `max_len` tokens (the question's end and the turn marker)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_len:] for t in texts]
    if any(len(i) == 0 for i in ids):
        raise UserError("a prompt encodes to no tokens; check the data and the tokenizer")
    from jaxrl_sparse.data.batching import pad_left
    return pad_left(ids, pad_id)


def load_math_splits(source: str, n_train: int, n_eval: int, seed: int = 0, *,
                     train_file: str = "", eval_file: str = "") -> Tuple[List[Dict], List[Dict]]:
    """(train, eval) problem lists. gsm8k: hub train/test splits (a seeded sample); jsonl: files with
    question/answer per line; generated: the offline GSM8K-style generator (disjoint splits)."""
    from jaxrl_sparse.data.math_problems import generate_splits, parse_generated_source
    difficulty = parse_generated_source(source)
    if difficulty is not None:
        return generate_splits(n_train, max(n_eval, 1), seed=seed, difficulty=difficulty)
    if source not in DATA_SOURCES:
        raise UserError(f"--data={source!r}; choose one of {', '.join(DATA_SOURCES)} (or generated:MIN-MAX)")
    if source == "jsonl":
        from jaxrl_sparse.data.sources import load_jsonl
        if not train_file:
            raise UserError("--data=jsonl needs --train_file=PATH (and optionally --eval_file=PATH)")
        train = load_jsonl(train_file, ("question", "answer"))
        test = load_jsonl(eval_file, ("question", "answer")) if eval_file else train
    else:
        from jaxrl_sparse.data.sources import load_gsm8k
        train, test = load_gsm8k("train"), load_gsm8k("test")
    rng = random.Random(seed)
    train, test = list(train), list(test)
    rng.shuffle(train)
    rng.shuffle(test)
    if len(train) < n_train:
        raise UserError(f"only {len(train)} training problems for --n_train={n_train}")
    return train[:n_train], test[:n_eval]


def gold_answers(problems: Sequence[Dict]) -> List[str]:
    """Gold answer strings: the text after `####` (GSM8K), else the whole answer field."""
    out = []
    for p in problems:
        a = str(p["answer"])
        out.append(a.rsplit("####", 1)[1].strip() if "####" in a else a.strip())
    return out


def score_completions(completions: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    """[B] float32 exact-match rewards (1 = numeric answer equals the gold)."""
    from jaxrl_sparse.rewards.math import exact_match_rewards
    return np.asarray(exact_match_rewards(list(completions), list(golds)), np.float32)
