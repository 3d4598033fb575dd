"""A small synthetic English-like corpus for the `tiny` preset and the tests: offline, deterministic, and with
enough structure (grammar, arithmetic facts, a little Unicode) that a tiny model's loss visibly falls."""
from __future__ import annotations

import random

NAMES = ["Ada", "Bram", "Chloé", "Dmitri", "Eun-ji", "Femi", "Grace", "Hiro", "Inés", "Jonas", "Kofi", "Lena"]
PLACES = ["the market", "the library", "a small café", "the harbour", "the old mill", "the garden", "Zürich",
          "the station", "the museum", "São Paulo"]
THINGS = ["apples", "books", "letters", "lanterns", "maps", "shells", "coins", "teacups", "kites", "candles"]
VERBS = ["found", "carried", "counted", "painted", "sold", "borrowed", "wrapped", "hid", "repaired", "gave away"]
MOODS = ["happily", "slowly", "carefully", "quietly", "at dawn", "in the rain", "before lunch", "with a friend"]


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind < 0.25:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} {a} {rng.choice(THINGS)} at {rng.choice(PLACES)}."
    if kind < 0.45:
        return f"In {rng.choice(PLACES)}, {rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(THINGS)} {rng.choice(MOODS)}."
    if kind < 0.65:
        return f"{a} plus {b} is {a + b}, and {a} times {b} is {a * b}."
    if kind < 0.8:
        return f"{rng.choice(NAMES)} asked: “Where are the {rng.choice(THINGS)}?” — “Near {rng.choice(PLACES)}.”"
    return f"There were {a} {rng.choice(THINGS)}; {rng.choice(NAMES)} kept {min(a, b)} and left {a - min(a, b)}."


def synthetic_documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents of 3 to 30 sentences each, the same for the same seed."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [sentence(rng) for _ in range(rng.randint(3, 30))]
        paragraphs = [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]
        docs.append("\n\n".join(paragraphs))
    return docs
