"""Real text classification data from WordNet 3.0 as Debian installs it: a noun's definition
(its gloss, written by WordNet's lexicographers) -> the semantic category WordNet files it under.

    apt-get install wordnet-base
    python examples/make_wordnet_data.py --output data/wordnet-topics

writes train.jsonl / val.jsonl of {"text": gloss, "label": category} rows, balanced over the
categories, split by synset so no definition of the held-out file was seen in training. The
example sentences after a gloss's ';' are dropped (they often contain the word itself).
WordNet's licence allows use, copying and redistribution with its copyright notice
(/usr/share/doc/wordnet-base/copyright); the files are generated on each machine, like the
dictionary data. Deterministic for a given WordNet release.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DATA_NOUN = Path("/usr/share/wordnet/data.noun")
# WordNet's lexicographer files (lexnames(5WN)) used as classes, and the label the model answers with.
CATEGORIES = {5: "animal", 6: "artifact", 8: "body", 13: "food", 18: "person", 20: "plant"}


def read_glosses(path: Path = DATA_NOUN) -> dict[str, list[str]]:
    """category -> glosses. A data.noun line: offset, lexicographer file number, ..., '| gloss'."""
    if not path.is_file():
        sys.exit(f"{path}: not installed; run: apt-get install wordnet-base")
    out: dict[str, list[str]] = {label: [] for label in CATEGORIES.values()}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(" ") or "|" not in line:  # the licence header lines start with two spaces
            continue
        label = CATEGORIES.get(int(line.split(" ", 2)[1]))
        gloss = line.split("|", 1)[1].split(";")[0].strip()
        gloss = re.sub(r"\s+", " ", gloss)
        if label and 20 <= len(gloss) <= 120 and '"' not in gloss:
            out[label].append(gloss)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument("--train", type=int, default=300, help="training rows, split evenly over the categories")
    parser.add_argument("--val", type=int, default=300, help="held-out rows, split evenly over the categories")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    glosses = read_glosses()
    per_train, per_val = args.train // len(CATEGORIES), args.val // len(CATEGORIES)
    rng = random.Random(args.seed)
    train, val = [], []
    for label, texts in glosses.items():
        texts = sorted(set(texts))
        if len(texts) < per_train + per_val:
            sys.exit(f"only {len(texts)} {label} definitions; ask for fewer with --train/--val")
        rng.shuffle(texts)
        train += [{"text": t, "label": label} for t in texts[:per_train]]
        val += [{"text": t, "label": label} for t in texts[per_train : per_train + per_val]]
    rng.shuffle(train)
    rng.shuffle(val)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(
        f"wrote {len(train)} + {len(val)} definitions in {len(CATEGORIES)} categories "
        f"({', '.join(CATEGORIES.values())}) to {out}"
    )


if __name__ == "__main__":
    main()
