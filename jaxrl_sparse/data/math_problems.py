"""Offline GSM8K-style word problems: multi-step integer arithmetic with `#### answer` solutions.

Each problem is a dict with GSM8K's fields: `question` (a short story ending in a question) and
`answer` (a worked solution, one line per step, then `#### n`). A problem is a chain of
operations on one quantity (items a person has, or dollars), built so every intermediate value is
a positive integer. Difficulty: the number of steps and the size of the numbers.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Optional, Sequence, Tuple

Problem = Dict[str, str]

_NAMES = [("Tom", "he", "his"), ("Maria", "she", "her"), ("James", "he", "his"),
          ("Aisha", "she", "her"), ("Ken", "he", "his"), ("Lucy", "she", "her"),
          ("Omar", "he", "his"), ("Grace", "she", "her"), ("Diego", "he", "his"),
          ("Priya", "she", "her"), ("Ben", "he", "his"), ("Sofia", "she", "her"),
          ("Liam", "he", "his"), ("Mei", "she", "her"), ("Noah", "he", "his"),
          ("Zara", "she", "her")]
_FRIENDS = ["her brother", "his sister", "a neighbor", "a classmate", "their cousin",
            "a friend", "the teacher", "grandma"]
_ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "stamps", "shells",
          "cards", "eggs", "beads", "toy cars"]
_CONTAINERS = {"apples": "bags", "marbles": "jars", "stickers": "sheets", "books": "boxes",
               "cookies": "boxes", "pencils": "packs", "stamps": "albums", "shells": "buckets",
               "cards": "packs", "eggs": "cartons", "beads": "bags", "toy cars": "boxes"}
_THINGS = [("notebooks", "notebook"), ("sandwiches", "sandwich"), ("tickets", "ticket"),
           ("plants", "plant"), ("T-shirts", "T-shirt"), ("pizzas", "pizza")]
_MULT_WORDS = {2: "double", 3: "triple"}


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard generated problems are."""
    min_steps: int = 2     # fewest operations after the starting amount
    max_steps: int = 4     # most operations
    max_value: int = 100   # bound on starting amounts and intermediate values
    max_operand: int = 12  # bound on the numbers in each operation

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self}")
        if self.max_value < 10 or self.max_operand < 2:
            raise ValueError(f"need max_value >= 10 and max_operand >= 2, got {self}")


def _items_step(rng, q, d, who, item):
    """One operation on an item count: (question sentence, solution line, new q) or None."""
    name, pron, poss = who
    pron_c = pron.capitalize()
    k = rng.randint(2, d.max_operand)
    op = rng.choice(["add", "gift", "packs", "sub", "mul", "div", "half"])
    if op == "add" and q + k <= d.max_value:
        return (f"{pron_c} buys {k} more {item}.", f"{name} has {q} + {k} = {q + k} {item}.",
                q + k)
    if op == "gift" and q + k <= d.max_value:
        friend = rng.choice(_FRIENDS)
        return (f"Then {friend} gives {name} {k} {item}.",
                f"After the gift {name} has {q} + {k} = {q + k} {item}.", q + k)
    if op == "packs":
        m = rng.randint(2, max(2, d.max_operand // 2))
        if q + m * k <= d.max_value:
            box = _CONTAINERS[item]
            return (f"{pron_c} buys {m} {box} of {item} with {k} {item} in each.",
                    f"The {box} hold {m} * {k} = {m * k} {item}, so {name} has "
                    f"{q} + {m * k} = {q + m * k} {item}.", q + m * k)
    if op == "sub" and k < q:
        friend = rng.choice(_FRIENDS)
        return (f"{pron_c} gives {k} {item} to {friend}.",
                f"{name} has {q} - {k} = {q - k} {item} left.", q - k)
    if op == "mul":
        m = rng.choice([2, 3])
        if q * m <= d.max_value:
            return (f"A week later {pron} manages to {_MULT_WORDS[m]} the number of {item} "
                    f"{pron} has.", f"{name} now has {q} * {m} = {q * m} {item}.", q * m)
    if op == "div":
        shares = [m for m in range(3, min(d.max_operand, 10) + 1) if q % m == 0 and q // m >= 1]
        if shares:
            m = rng.choice(shares)
            return (f"{pron_c} splits {poss} {item} equally among {m} people, including "
                    f"{'herself' if pron == 'she' else 'himself'}, and keeps one share.",
                    f"Each share is {q} / {m} = {q // m} {item}.", q // m)
    if op == "half" and q % 2 == 0 and q >= 2:
        return (f"{pron_c} loses half of {poss} {item}.",
                f"Half of {q} is {q} / 2 = {q // 2}, so {name} has {q // 2} {item}.", q // 2)
    return None


def _money_step(rng, q, d, who):
    name, pron, poss = who
    pron_c = pron.capitalize()
    k = rng.randint(2, d.max_operand)
    op = rng.choice(["earn", "spend", "buy", "mul", "div"])
    if op == "earn" and q + k <= d.max_value:
        return (f"{pron_c} earns ${k} walking dogs.", f"{name} has {q} + {k} = ${q + k}.", q + k)
    if op == "spend" and k < q:
        thing = rng.choice(_THINGS)[1]
        return (f"{pron_c} spends ${k} on a {thing}.", f"{name} has {q} - {k} = ${q - k} left.",
                q - k)
    if op == "buy":
        plural, _ = rng.choice(_THINGS)
        m = rng.randint(2, max(2, d.max_operand // 2))
        c = rng.randint(2, max(2, d.max_operand // 2))
        if m * c < q:
            return (f"{pron_c} buys {m} {plural} that cost ${c} each.",
                    f"The {plural} cost {m} * {c} = ${m * c}, so {name} has "
                    f"{q} - {m * c} = ${q - m * c} left.", q - m * c)
    if op == "mul":
        m = rng.choice([2, 3])
        if q * m <= d.max_value:
            return (f"{poss.capitalize()} savings {_MULT_WORDS[m]} after a birthday.",
                    f"{name} now has {q} * {m} = ${q * m}.", q * m)
    if op == "div":
        shares = [m for m in range(2, min(d.max_operand, 10) + 1) if q % m == 0]
        if shares:
            m = rng.choice(shares)
            return (f"{pron_c} puts {poss} money into {m} equal envelopes and keeps one.",
                    f"One envelope holds {q} / {m} = ${q // m}.", q // m)
    return None


def generate_problem(rng: random.Random, difficulty: Difficulty = Difficulty()) -> Problem:
    """One problem drawn with `rng` (a `random.Random`)."""
    d = difficulty
    who = rng.choice(_NAMES)
    name = who[0]
    n_steps = rng.randint(d.min_steps, d.max_steps)
    q = rng.randint(5, max(6, d.max_value // 2))
    money = rng.random() < 0.35
    if money:
        sentences = [f"{name} has ${q}."]
        question = f"How many dollars does {name} have now?"
    else:
        item = rng.choice(_ITEMS)
        sentences = [rng.choice([f"{name} has {q} {item}.",
                                 f"{name} starts the day with {q} {item}."])]
        question = f"How many {item} does {name} have now?"
    lines = []
    while len(lines) < n_steps:
        step = _money_step(rng, q, d, who) if money else _items_step(rng, q, d, who, item)
        if step is None:
            continue
        sentence, line, q = step
        sentences.append(sentence)
        lines.append(line)
    return {"question": " ".join(sentences + [question]),
            "answer": "\n".join(lines + [f"#### {q}"])}


def generate_problems(n: int, seed: int = 0, difficulty: Difficulty = Difficulty()
                      ) -> List[Problem]:
    """`n` problems with distinct questions, deterministic for `seed`."""
    rng = random.Random(seed)
    out: List[Problem] = []
    seen = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot build {n} distinct problems at {difficulty}; "
                             "raise max_value/max_steps or ask for fewer")
        p = generate_problem(rng, difficulty)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def train_test_split(problems: Sequence[Problem], n_test: int, seed: int = 0
                     ) -> Tuple[List[Problem], List[Problem]]:
    """Shuffles (deterministically) and splits so no question is in both parts.

    Duplicate questions are dropped first (the first occurrence is kept).
    """
    unique: Dict[str, Problem] = {}
    for p in problems:
        unique.setdefault(p["question"], p)
    items = list(unique.values())
    if not 0 <= n_test <= len(items):
        raise ValueError(f"n_test={n_test} but only {len(items)} distinct problems")
    random.Random(seed).shuffle(items)
    return items[n_test:], items[:n_test]


def generate_splits(n_train: int, n_test: int, seed: int = 0,
                    difficulty: Difficulty = Difficulty()) -> Tuple[List[Problem], List[Problem]]:
    """Disjoint (train, test) lists of generated problems."""
    probs = generate_problems(n_train + n_test, seed, difficulty)
    return train_test_split(probs, n_test, seed)


def gold_answer(problem: Problem) -> int:
    """The integer after `####` in a problem's answer."""
    return int(problem["answer"].rsplit("####", 1)[1].strip().replace(",", ""))


def parse_generated_source(source: str) -> Optional[Difficulty]:
    """`generated` -> default Difficulty; `generated:A-B` -> A..B operations per problem (easier
    or harder offline sets, e.g. `generated:1-2` for small models); anything else -> None."""
    if source == "generated":
        return Difficulty()
    if not source.startswith("generated:"):
        return None
    spec = source.split(":", 1)[1]
    try:
        lo, hi = (int(x) for x in spec.split("-"))
        return Difficulty(min_steps=lo, max_steps=hi)
    except ValueError:
        from jaxrl_sparse.errors import UserError
        raise UserError(f"--data={source!r}: write generated:MIN-MAX with 1 <= MIN <= MAX, "
                        "e.g. generated:1-2") from None
