"""Data: review openings and prompts, generated word problems, JSONL and hub loaders."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from jaxrl_sparse.data import math_problems as mp
from jaxrl_sparse.data import reviews, sources
from jaxrl_sparse.errors import UserError
from jaxrl_sparse.rewards.math import correctness_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_review_openings_deterministic_distinct_varied():
    a = reviews.generate_review_openings(600, seed=0)
    assert a == reviews.generate_review_openings(600, seed=0)
    assert len(set(a)) == 600
    assert a[:50] != reviews.generate_review_openings(50, seed=1)
    prompts = {reviews.ppo_prompt(t) for t in a}
    assert len(prompts) > 300  # the 8-word prompts themselves are varied
    assert all(len(t.split()) >= 8 for t in a)
    assert not any(re.search(r"\ba [aeiou]", t) for t in a)  # articles agree


def test_ppo_prompt_format():
    text = "I watched this movie last weekend and I still do not know"
    assert reviews.ppo_prompt(text) == (
        "Sentiment: positive review. I watched this movie last weekend and I")
    assert reviews.ppo_prompt("Too short.", n_words=8) == "Sentiment: positive review. Too short."
    assert reviews.ppo_prompt(text, n_words=2, prefix="") == "I watched"
    assert reviews.clean_review("Great.<br /><br />Really   great.") == "Great. Really great."


_CALC = re.compile(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)")


def test_generated_problems_are_consistent():
    d = mp.Difficulty(min_steps=2, max_steps=5, max_value=200, max_operand=12)
    probs = mp.generate_problems(300, seed=3, difficulty=d)
    assert probs == mp.generate_problems(300, seed=3, difficulty=d)
    assert len({p["question"] for p in probs}) == 300
    for p in probs:
        assert set(p) == {"question", "answer"} and p["question"].endswith("now?")
        lines = p["answer"].split("\n")
        assert lines[-1].startswith("#### ")
        assert d.min_steps <= len(lines) - 1 <= d.max_steps
        last = None
        for line in lines[:-1]:
            calcs = _CALC.findall(line)
            assert calcs, line
            for a, op, b, c in calcs:  # every worked step is correct integer arithmetic
                a, b, c = int(a), int(b), int(c)
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c, line
                assert op != "/" or a % b == 0
                assert 0 < c <= d.max_value
                last = c
        gold = mp.gold_answer(p)
        assert gold == last
        assert correctness_reward(p["answer"], gold) == 1.0  # rewards read the solutions


def test_difficulty_knob_and_split():
    easy = mp.generate_problems(50, seed=0, difficulty=mp.Difficulty(1, 1, 20, 5))
    assert all(len(p["answer"].split("\n")) == 2 for p in easy)
    assert all(mp.gold_answer(p) <= 20 for p in easy)
    train, test = mp.generate_splits(200, 40, seed=5)
    assert len(train) == 200 and len(test) == 40
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    dup = train[:10] + train[:10]
    tr, te = mp.train_test_split(dup, 3, seed=0)
    assert len(tr) + len(te) == 10 and not {p["question"] for p in tr} & {
        p["question"] for p in te}
    with pytest.raises(ValueError):
        mp.Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        mp.train_test_split(dup, 11)


def test_load_jsonl_good_and_bad(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n'
                    '{"question": "2+2?", "answer": "#### 4", "extra": 1}\n')
    recs = sources.load_jsonl(str(good), ["question", "answer"])
    assert [r["question"] for r in recs] == ["1+1?", "2+2?"]
    assert len(sources.load_jsonl(str(good), ["question"], limit=1)) == 1

    with pytest.raises(UserError, match="no such file"):
        sources.load_jsonl(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n{"question": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        sources.load_jsonl(str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"question": "a", "answer": "1"}) + "\n"
                       + json.dumps({"question": "b"}) + "\n")
    with pytest.raises(UserError, match=r"nofield.jsonl:2: missing field\(s\) \['answer'\]"):
        sources.load_jsonl(str(nofield), ["question", "answer"])
    arr = tmp_path / "arr.jsonl"
    arr.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="expected a JSON object"):
        sources.load_jsonl(str(arr))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no records"):
        sources.load_jsonl(str(empty))


def test_hub_unreachable_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.time()
    with pytest.raises(UserError, match=r"openai/gsm8k \(main\) unreachable \(no network\?\); "
                                        r"use --prompts_file=.* or --data=generated"):
        sources.load_gsm8k("train")
    with pytest.raises(UserError, match="stanfordnlp/imdb unreachable"):
        sources.load_imdb("test")
    assert time.time() - t < 8.0


def test_hub_offline_mode_fails_fast_with_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), PYTHONPATH=ROOT)
    code = ("from jaxrl_sparse.data.sources import load_imdb\n"
            "from jaxrl_sparse.errors import UserError\n"
            "try:\n    load_imdb('train')\nexcept UserError as e:\n    print('UE', e)\n")
    t = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    elapsed = time.time() - t
    assert out.stdout.startswith("UE dataset stanfordnlp/imdb"), out.stdout + out.stderr
    assert "--data=generated" in out.stdout
    assert elapsed < 20.0  # importing `datasets` dominates; no network retries
