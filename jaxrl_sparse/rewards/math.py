"""Math rewards: answer extraction, correctness, format and anti-hacking penalties.

Lessons from the GRPO seed built in: a correctness-only reward is sparse and gets hacked
(`Answer:\\nAnswer:\\nAnswer:...`), so `math_reward` adds a small format bonus for a single
well-formed `Answer: <number>` line and a repetition penalty. `exact_match_reward` is the ES seed's
reward: 1.0 when the `#### n` answer (else the last number) equals the gold number.

Numbers understood: `1,234`, `$1,234.50`, `-3.5`, `−2` (unicode minus), `.5`, `3/4`,
`\\frac{3}{4}`, `45%` (-> 45), with trailing periods ignored.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence, Union

import numpy as np

from jaxrl_sparse.errors import UserError

_NUMBER = (
    r"(?<![\w.])"                      # not glued to a word or another number
    r"(?:[-−]\s?\$?|\$\s?-?)?"         # sign and/or dollar in either order
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?"       # a fraction's denominator
    r"%?"
)
NUMBER_RE = re.compile(_NUMBER)
_FULL_NUMBER_RE = re.compile(r"^\s*" + _NUMBER + r"\s*\.?\s*$")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_GSM_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_RE = re.compile(r"(?:final\s+)?answer\s*(?:is\s*[:：]?|[:：])", re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(r"answer\**\s*[:：]", re.IGNORECASE)
_ANSWER_LINE_RE = re.compile(
    r"^\s*(?:\*\*)?answer(?:\*\*)?\s*[:：]\s*(?:\*\*)?(.*?)(?:\*\*)?\s*$", re.IGNORECASE)
_RUN_RE = re.compile(r"(.{3,60}?)\1{3,}", re.DOTALL)

Number = Union[int, float]


def _normalize(text: str) -> str:
    text = _FRAC_RE.sub(r"\1/\2", text)
    return text.replace("{,}", ",").replace("\\$", "$").replace("\\%", "%")


def _value(token: str) -> Optional[float]:
    """Float value of one NUMBER_RE match."""
    t = token.replace("−", "-").replace("$", "").replace(",", "").replace("%", "")
    t = re.sub(r"\s+", "", t)
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            d = float(den)
            return None if d == 0 else float(num) / d
        return float(t)
    except ValueError:
        return None


def _numbers(text: str):
    return [m.group(0) for m in NUMBER_RE.finditer(text)]


def extract_answer(text: str) -> Optional[str]:
    """The answer's number as written (e.g. `"1,234"`, `"-3.5"`, `"3/4"`), or None.

    Priority: the last `#### x` (GSM8K gold/solution style), the last `\\boxed{x}`, the last
    `Answer: x` / `the answer is x` phrase that is followed by a number on its line (first number
    after it); otherwise the last number anywhere in the text.
    """
    if not text:
        return None
    text = _normalize(text)
    for m in reversed(list(_GSM_RE.finditer(text))):
        nums = _numbers(m.group(1))
        if nums:
            return nums[0].strip()
    for m in reversed(list(_BOXED_RE.finditer(text))):
        nums = _numbers(m.group(1))
        if nums:
            return nums[0].strip()
    for m in reversed(list(_ANSWER_RE.finditer(text))):
        rest = text[m.end():].split("\n", 1)[0]
        nums = _numbers(rest)
        if nums:
            return nums[0].strip()
    nums = _numbers(text)
    return nums[-1].strip() if nums else None


def parse_number(s: Optional[str]) -> Optional[float]:
    """Float value of a number string (`"$1,234."`, `"3/4"`, `"-3.5%"`); the last number when
    the string holds several; None when it holds none."""
    if s is None:
        return None
    nums = _numbers(_normalize(str(s)))
    return _value(nums[-1]) if nums else None


def answer_value(text: str) -> Optional[float]:
    """`parse_number(extract_answer(text))`."""
    return parse_number(extract_answer(text))


def _gold_value(gold: Union[str, Number]) -> float:
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return float(gold)
    v = answer_value(str(gold))
    if v is None:
        raise UserError(f"gold answer {str(gold)[:80]!r} holds no number (fix the data file)")
    return v


def numbers_equal(a: Optional[float], b: Optional[float], tol: float = 1e-6) -> bool:
    """|a - b| <= tol * max(1, |b|); False when either is None."""
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def correctness_reward(output: str, gold: Union[str, Number], tol: float = 1e-6) -> float:
    """1.0 when the output's answer (see `extract_answer`) equals the gold number, else 0.0.

    `gold` may be a number, a number string, or a GSM8K solution ending in `#### n`.
    """
    return float(numbers_equal(answer_value(output), _gold_value(gold), tol))


def exact_match_reward(output: str, gold: Union[str, Number], tol: float = 1e-6) -> float:
    """ES seed reward: 1.0 when the number after the last `####` (else the last number in the
    output) equals the gold number."""
    text = _normalize(output or "")
    gsm = list(_GSM_RE.finditer(text))
    nums = _numbers(gsm[-1].group(1)) if gsm else []
    pred = _value(nums[0]) if nums else None
    if pred is None:
        allnums = _numbers(text)
        pred = _value(allnums[-1]) if allnums else None
    return float(numbers_equal(pred, _gold_value(gold), tol))


def format_reward(output: str) -> float:
    """1.0 when the output has exactly one `Answer:` and it is a line `Answer: <number>`."""
    if not output or len(_ANSWER_COLON_RE.findall(output)) != 1:
        return 0.0
    for line in output.splitlines():
        m = _ANSWER_LINE_RE.match(line)
        if m:
            return 1.0 if _FULL_NUMBER_RE.match(_normalize(m.group(1))) else 0.0
    return 0.0


def repetition_penalty(output: str, ngram: int = 4) -> float:
    """A score in [-1, 0]: 0 for ordinary text, down to -1 for degenerate, hacked outputs.

    The worst of four signals:
      repeated `Answer:` markers:  min(1, (count - 1) / 3)
      duplicated lines (>= 3 non-empty):  (dup_frac - 0.2) / 0.8
      duplicated word n-grams (>= 10):    (dup_frac - 0.25) / 0.75
      verbatim runs (a 3-60 char unit repeated >= 4 times, run >= 16 chars): (coverage - 0.1) / 0.5
    """
    if not output:
        return 0.0
    signals = [0.0]
    n_ans = len(_ANSWER_COLON_RE.findall(output))
    if n_ans > 1:
        signals.append((n_ans - 1) / 3.0)
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if len(lines) >= 3:
        dup = 1.0 - len(set(lines)) / len(lines)
        signals.append((dup - 0.2) / 0.8)
    words = output.split()
    grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    if len(grams) >= 10:
        dup = 1.0 - len(set(grams)) / len(grams)
        signals.append((dup - 0.25) / 0.75)
    covered = sum(len(m.group(0)) for m in _RUN_RE.finditer(output) if len(m.group(0)) >= 16)
    signals.append((covered / len(output) - 0.1) / 0.5)
    worst = min(1.0, max(signals))
    return -float(worst) if worst > 0 else 0.0


def math_reward(output: str, gold: Union[str, Number], *, w_correct: float = 1.0,
                w_format: float = 0.1, w_repeat: float = 0.5) -> float:
    """w_correct * correct + w_format * format + w_repeat * repetition_penalty (penalty <= 0)."""
    return (w_correct * correctness_reward(output, gold) + w_format * format_reward(output)
            + w_repeat * repetition_penalty(output))


def math_rewards(outputs: Sequence[str], golds: Sequence[Union[str, Number]], **kw) -> np.ndarray:
    """`math_reward` over a batch -> float32 `[B]`."""
    if len(outputs) != len(golds):
        raise ValueError(f"{len(outputs)} outputs but {len(golds)} gold answers")
    return np.asarray([math_reward(o, g, **kw) for o, g in zip(outputs, golds)], np.float32)


def exact_match_rewards(outputs: Sequence[str], golds: Sequence[Union[str, Number]]) -> np.ndarray:
    """`exact_match_reward` over a batch -> float32 `[B]`."""
    if len(outputs) != len(golds):
        raise ValueError(f"{len(outputs)} outputs but {len(golds)} gold answers")
    return np.asarray([exact_match_reward(o, g) for o, g in zip(outputs, golds)], np.float32)
