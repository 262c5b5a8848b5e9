"""Movie-review prompts: the PPO seed's prompt format and an offline generator of review openings.

The seed (TRL sentiment example on IMDB) prompts the policy with the first words of a review
behind a control prefix: `Sentiment: positive review. <first 8 words>`. Offline there is no IMDB,
so `generate_review_openings` builds varied, deterministic openings from templates (thousands of
distinct combinations), mostly neutral in tone so the sentiment reward has room to move.
"""
from __future__ import annotations

import random
import re
from typing import List

PROMPT_PREFIX = "Sentiment: positive review."

_OPENERS = [
    "I watched", "I finally saw", "Last night I rented", "My friends dragged me to see",
    "I went into", "I had high hopes for", "I did not expect much from", "I caught",
    "On a rainy Sunday I watched", "My wife and I watched", "I stumbled upon",
    "After reading the book I watched", "I was curious about", "My teenage son picked",
    "I saw the trailer for", "For a film class I had to watch",
]
_SUBJECTS = [
    "this movie", "this film", "the sequel", "the remake", "this documentary",
    "this horror flick", "this romantic comedy", "the director's latest film",
    "this low-budget thriller", "this animated feature", "this period drama",
    "the new superhero movie", "this western", "this war film", "this indie drama",
    "this science fiction epic", "this musical", "this courtroom drama", "this heist movie",
    "this family comedy",
]
_WHEN = [
    "last weekend", "on cable", "at a film festival", "on DVD", "in an almost empty theater",
    "on a long flight", "with my parents", "late at night", "on a streaming service",
    "at a midnight screening", "twice in one week", "after it won an award",
]
_REACTIONS = [
    "I still do not know what to make of it", "I have mixed feelings about it",
    "I want to talk about the ending", "it stayed with me for days",
    "I think it deserves a closer look", "my opinion kept changing while I watched",
    "I have a lot to say about it", "the audience around me was silent",
    "it was not what I expected", "I went home thinking about the lead actor",
]
_ADJECTIVES = [
    "quiet", "ambitious", "strange", "long", "slow-burning", "low-budget", "two-hour",
    "black-and-white", "French", "loud", "earnest", "small", "sprawling", "old-fashioned",
    "unusual", "dark", "colorful", "talky", "modest", "big-budget",
]
_GENRES = [
    "drama", "comedy", "thriller", "mystery", "romance", "horror film", "adventure",
    "biopic", "satire", "crime story", "road movie", "coming-of-age story",
]
_PREMISES = [
    "a family that inherits a crumbling hotel", "two strangers stuck on a night train",
    "a detective who returns to her hometown", "a boxer who gets one last fight",
    "a teacher in a small mining town", "a band on its final tour",
    "a chef who loses her sense of taste", "a soldier coming home after the war",
    "a group of friends planning a bank robbery", "an astronaut stranded on the moon",
    "a widower who starts painting again", "twin brothers who swap lives",
    "a journalist chasing a political scandal", "a girl and her stubborn horse",
]
_TITLE_NOUNS = ["Silence", "Shadows", "Harvest", "Return", "Garden", "River", "Winter",
                "Promise", "Lantern", "Crossing", "Echoes", "Orchard"]
_TITLE_PLACES = ["Ashford", "the North", "Midnight", "Red Hill", "Lake Mora", "the Valley",
                 "Stone Bay", "Elmwood"]
_FIRST = ["Anna", "James", "Maria", "Daniel", "Sophie", "Marcus", "Elena", "Tom", "Grace",
          "Victor", "Nora", "Samuel", "Irene", "Leo"]
_LAST = ["Hale", "Moreno", "Fischer", "Okafor", "Lindqvist", "Brennan", "Castillo", "Wright",
         "Nakamura", "Duval"]
_ROLES = ["a tired police officer", "a retired pianist", "a small-town mayor",
          "a nervous bride", "a con artist", "a single father", "a ship captain",
          "an aging rock star"]
_ASPECTS = ["The music", "The camera work", "The script", "The acting", "The pacing",
            "The set design", "The dialogue", "The ending"]
_ASPECT_VERBS = ["is the first thing you notice", "takes some getting used to",
                 "sets the tone early", "is hard to describe", "changes halfway through"]
_CONTRASTS = ["the story is what I want to discuss", "the cast carries most of the weight",
              "the plot raises a lot of questions", "the characters are what matter here"]


def _title(rng: random.Random) -> str:
    return f"The {rng.choice(_TITLE_NOUNS)} of {rng.choice(_TITLE_PLACES)}"


def _a(word: str) -> str:
    """`word` with its indefinite article."""
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def _opening(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return (f"{rng.choice(_OPENERS)} {rng.choice(_SUBJECTS)} {rng.choice(_WHEN)} and "
                f"{rng.choice(_REACTIONS)}.")
    if kind == 1:
        return (f"\"{_title(rng)}\" is {_a(rng.choice(_ADJECTIVES))} {rng.choice(_GENRES)} "
                f"about {rng.choice(_PREMISES)}.")
    if kind == 2:
        return (f"I sat down to watch {_a(rng.choice(_GENRES))} about "
                f"{rng.choice(_PREMISES)}, and {rng.choice(_REACTIONS)}.")
    if kind == 3:
        return (f"{rng.choice(_ASPECTS)} in {rng.choice(_SUBJECTS)} "
                f"{rng.choice(_ASPECT_VERBS)}, but {rng.choice(_CONTRASTS)}.")
    return (f"{rng.choice(_FIRST)} {rng.choice(_LAST)} plays {rng.choice(_ROLES)} in this "
            f"{rng.choice(_ADJECTIVES)} {rng.choice(_GENRES)}, and {rng.choice(_REACTIONS)}.")


def generate_review_openings(n: int, seed: int = 0) -> List[str]:
    """`n` distinct review openings (one or two sentences each), deterministic for `seed`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    out: List[str] = []
    seen = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot build {n} distinct review openings; ask for fewer")
        text = _opening(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def clean_review(text: str) -> str:
    """IMDB texts carry `<br />` tags: turn them into spaces and collapse whitespace."""
    return re.sub(r"\s+", " ", re.sub(r"<br\s*/?>", " ", text)).strip()


def ppo_prompt(text: str, n_words: int = 8, prefix: str = PROMPT_PREFIX) -> str:
    """The seed's PPO prompt: `"Sentiment: positive review. " + first n_words of the review`."""
    words = text.split()[:n_words]
    return f"{prefix} {' '.join(words)}" if prefix else " ".join(words)
