"""Math answer extraction/rewards on real-looking outputs, and the VADER sentiment reward."""
import numpy as np
import pytest

from jaxrl_sparse.errors import UserError
from jaxrl_sparse.rewards import math as rm
from jaxrl_sparse.rewards import sentiment

CHAT = ("Let's think step by step.\nJanet's ducks lay 16 eggs per day. She eats 3 and bakes "
        "with 4, so 16 - 3 - 4 = 9 eggs remain.\nShe sells them at $2 each: 9 * 2 = 18.\n"
        "Answer: 18")

# (output, extracted answer string, value, format_reward)
TABLE = [
    (CHAT, "18", 18.0, 1.0),
    ("The answer is $1,234.", "$1,234", 1234.0, 0.0),
    ("She pays 2 * 3 = 6 dollars.\n#### -3.5", "-3.5", -3.5, 0.0),
    ("Answer: 3/4", "3/4", 0.75, 1.0),
    ("So the result is \\boxed{\\frac{3}{4}} as computed from 12 and 16.", "3/4", 0.75, 0.0),
    ("The price went up 45%.", "45%", 45.0, 0.0),
    ("The answer is 42 because 6 * 7 = 42 and 5 + 1 = 6", "42", 42.0, 0.0),
    ("x-3 is not a number here, but 5-3=2", "2", 2.0, 0.0),
    ("He now has −7 points.", "−7", -7.0, 0.0),
    ("Answer: 1,000,000.", "1,000,000", 1e6, 1.0),
    ("Answer: about 12 apples", "12", 12.0, 0.0),            # not a bare number line
    ("Answer: 5\nAnswer: 5", "5", 5.0, 0.0),                  # two answer lines
    ("Answer:\nAnswer:\nAnswer:\nAnswer:\nAnswer:", None, None, 0.0),
    ("I do not know.", None, None, 0.0),
    ("", None, None, 0.0),
]


@pytest.mark.parametrize("text,ans,val,fmt", TABLE)
def test_extract_parse_format(text, ans, val, fmt):
    assert rm.extract_answer(text) == ans
    got = rm.parse_number(ans)
    assert (got is None and val is None) or got == pytest.approx(val)
    assert rm.format_reward(text) == fmt


def test_parse_number_variants():
    assert rm.parse_number("$1,234.") == 1234.0
    assert rm.parse_number("-$20") == -20.0
    assert rm.parse_number(".5") == 0.5
    assert rm.parse_number("7 / 0") is None  # division by zero is not a number
    assert rm.parse_number("no digits") is None
    assert rm.parse_number(None) is None


def test_correctness_and_exact_match():
    gold_solution = "She has 9 eggs.\n9 * 2 = <<9*2=18>>18\n#### 18"
    assert rm.correctness_reward(CHAT, gold_solution) == 1.0
    assert rm.correctness_reward(CHAT, 18) == 1.0
    assert rm.correctness_reward(CHAT, "19") == 0.0
    assert rm.correctness_reward("Answer: 3/4", "0.75") == 1.0
    assert rm.correctness_reward("The answer is $1,234.", "1234") == 1.0
    assert rm.correctness_reward("", "5") == 0.0
    with pytest.raises(UserError):
        rm.correctness_reward(CHAT, "no number here")
    # ES reward: `#### n` wins over later numbers; else the last number
    assert rm.exact_match_reward("#### 18\nthat is 2 more than 16", 18) == 1.0
    assert rm.exact_match_reward("so 16 + 2 = 18", "#### 18") == 1.0
    assert rm.exact_match_reward("Answer: 18. Check: 9 * 2", 18) == 0.0  # last number is 2
    np.testing.assert_array_equal(rm.exact_match_rewards(["18", "17"], [18, 18]), [1.0, 0.0])


def test_repetition_penalty_flags_hacking_not_reasoning():
    assert rm.repetition_penalty(CHAT) == 0.0
    assert rm.repetition_penalty("") == 0.0
    assert rm.repetition_penalty("Answer: 18") == 0.0
    assert rm.repetition_penalty("Answer:\n" * 20) == -1.0
    assert rm.repetition_penalty("AnswerAnswerAnswerAnswerAnswerAnswer 5") < -0.5
    loop = "Step: add the numbers again. " * 12 + "Answer: 4"
    assert rm.repetition_penalty(loop) <= -0.9
    two = rm.repetition_penalty("Answer: 5\nAnswer: 5")
    assert -1.0 < two < 0.0


def test_math_reward_combines_terms():
    assert rm.math_reward(CHAT, 18) == pytest.approx(1.0 + 0.1)
    assert rm.math_reward(CHAT, 17) == pytest.approx(0.1)
    hacked = "Answer:\n" * 10 + "Answer: 18"
    # correct number but degenerate: 1.0 + 0 (format needs a single Answer) - 0.5
    assert rm.math_reward(hacked, 18) == pytest.approx(0.5)
    assert rm.math_reward(hacked, 18, w_repeat=1.0) == pytest.approx(0.0)
    batch = rm.math_rewards([CHAT, "", hacked], [18, 18, 18])
    assert batch.dtype == np.float32 and batch.shape == (3,)
    np.testing.assert_allclose(batch, [1.1, 0.0, 0.5], rtol=1e-6)
    with pytest.raises(ValueError):
        rm.math_rewards([CHAT], [1, 2])


def test_vader_reward():
    r = sentiment.make_sentiment_reward("vader")
    s = r(["This movie was wonderful, I loved every minute of it!",
           "Terrible, boring and awful. I hated it.", ""])
    assert s.dtype == np.float32 and s.shape == (3,)
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0
    assert np.all(np.abs(s) <= 1.0)
    with pytest.raises(TypeError):
        r("one string")
    with pytest.raises(UserError):
        sentiment.make_sentiment_reward("vader", batch_size=4)
