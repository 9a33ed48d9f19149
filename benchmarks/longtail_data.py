"""Long-tailed chat data with a fixed seed: user turns of 5-60 words, assistant answers whose
length follows a Pareto distribution capped at 300 words (most short, a few very long), as in
real chat SFT sets. Words come from a fixed vocabulary, with a little structure so the loss can fall.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the a model data train token loss learning rate batch step adapter layer weight matrix value query key "
    "attention head vector memory time fast slow small large tiny value answer question user assistant system "
    "please thanks sure okay yes no maybe because therefore however also then first second third next last "
    "open close read write load save run stop start end begin cafe coffee milk tea cake bread order refund "
    "wifi password street library morning evening day week month year number one two three four five six "
    "seven eight nine ten hundred thousand good bad new old long short high low right left up down in out"
).split()


def conversation(rng: random.Random) -> dict:
    user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
    n = min(300, int(rng.paretovariate(1.1) * 8))
    # Answers repeat a seed phrase from the question: learnable structure for the loss to find.
    seed = user.split()[:3]
    answer = " ".join(seed[i % len(seed)] if i % 4 == 0 else rng.choice(WORDS) for i in range(max(1, n)))
    return {
        "messages": [
            {"role": "user", "content": user.capitalize() + "?"},
            {"role": "assistant", "content": answer.capitalize() + "."},
        ]
    }


def write(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng)) + "\n")
    return path
