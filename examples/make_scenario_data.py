"""Regenerate the data of every scenario example (examples/<scenario>/): written for phitune.

Each set is built from small hand-written vocabularies with a fixed seed, so it is learnable by a
tiny model in a short run and the held-out files combine the same pieces in unseen ways.
`python examples/make_scenario_data.py` rewrites the same files byte for byte.
"""

import csv
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# --- classification: café reviews -> positive / negative / neutral (CSV) -------------------------

POSITIVE = ["delicious", "friendly", "lovely", "excellent", "cosy", "perfect", "wonderful", "fresh"]
NEGATIVE = ["cold", "rude", "awful", "dirty", "slow", "stale", "terrible", "burnt"]
NEUTRAL = ["ordinary", "average", "fine", "standard", "usual", "normal", "plain", "okay"]
THINGS = ["coffee", "staff", "croissant", "tea", "service", "music", "cake", "latte", "table", "soup"]
OPENERS = ["The", "Honestly the", "Today the", "I thought the", "Our", "My"]


def classification(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label, words = rng.choice([("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)])
        a, b = rng.sample(THINGS, 2)
        text = f"{rng.choice(OPENERS)} {a} was {rng.choice(words)} and the {b} was {rng.choice(words)}."
        rows.append({"text": text, "label": label})
    return rows


# --- NER: tokens + BIO tags, people / places / organisations ------------------------------------

PEOPLE = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas"]
PLACES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Hanoi"]
ORGS = [["Acme"], ["Harbour", "Bank"], ["Blue", "Bean", "Roasters"], ["City", "Library"], ["Nova", "Labs"]]
NER_FRAMES = [
    ["{P}", "met", "{P}", "in", "{L}", "."],
    ["{P}", "works", "for", "{O}", "in", "{L}", "."],
    ["{O}", "opened", "a", "shop", "in", "{L}", "."],
    ["Yesterday", "{P}", "flew", "to", "{L}", "with", "{P}", "."],
    ["The", "manager", "of", "{O}", "is", "{P}", "."],
]


def ner(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for slot in rng.choice(NER_FRAMES):
            if slot == "{P}":
                tokens.append(rng.choice(PEOPLE)), tags.append("B-PER")
            elif slot == "{L}":
                tokens.append(rng.choice(PLACES)), tags.append("B-LOC")
            elif slot == "{O}":
                words = rng.choice(ORGS)
                tokens += words
                tags += ["B-ORG"] + ["I-ORG"] * (len(words) - 1)
            else:
                tokens.append(slot), tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


# --- translation: English -> French café phrases ------------------------------------------------

NOUNS = {
    "coffee": ("le café", "m"),
    "tea": ("le thé", "m"),
    "cake": ("le gâteau", "m"),
    "soup": ("la soupe", "f"),
    "milk": ("le lait", "m"),
    "bread": ("le pain", "m"),
    "table": ("la table", "f"),
    "cup": ("la tasse", "f"),
}
ADJECTIVES = {
    "hot": ("chaud", "chaude"),
    "cold": ("froid", "froide"),
    "good": ("bon", "bonne"),
    "small": ("petit", "petite"),
    "big": ("grand", "grande"),
    "sweet": ("sucré", "sucrée"),
}


def translation(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        noun, adj = rng.choice(list(NOUNS)), rng.choice(list(ADJECTIVES))
        fr_noun, gender = NOUNS[noun]
        fr_adj = ADJECTIVES[adj][0 if gender == "m" else 1]
        if rng.random() < 0.5:
            rows.append(
                {"source": f"The {noun} is {adj}.", "target": f"{fr_noun[0].upper() + fr_noun[1:]} est {fr_adj}."}
            )
        else:
            rows.append({"source": f"Is the {noun} {adj}?", "target": f"Est-ce que {fr_noun} est {fr_adj} ?"})
    return rows


# --- QA: questions answered from a short context (a JSON array) ---------------------------------

SHOPS = ["PhiCafe", "Bean Corner", "The Kettle", "Moka House", "Latte Lane", "Crema Bar"]
HOURS = ["7 am", "8 am", "9 am", "6 am", "10 am"]
STREETS = ["Harbour Street", "Mill Road", "Park Lane", "King Street", "Station Road"]
DRINKS = ["flat white", "mocha", "chai latte", "espresso", "cold brew"]


def qa(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        shop, hour, street, drink = rng.choice(SHOPS), rng.choice(HOURS), rng.choice(STREETS), rng.choice(DRINKS)
        context = f"{shop} is on {street}. It opens at {hour}. The most popular drink is the {drink}."
        question, answer = rng.choice(
            [
                (f"Where is {shop}?", street),
                (f"When does {shop} open?", hour),
                (f"What is the most popular drink at {shop}?", drink),
            ]
        )
        rows.append({"question": question, "context": context, "answer": answer})
    return rows


# --- chatbot: multi-turn ShareGPT conversations ---------------------------------------------------

ORDERS = {
    "latte": "One latte, coming up. Anything else?",
    "tea": "One tea, coming up. Anything else?",
    "mocha": "One mocha, coming up. Anything else?",
    "espresso": "One espresso, coming up. Anything else?",
}
EXTRAS = {
    "a croissant": "Adding a croissant. That will be ready in five minutes.",
    "a muffin": "Adding a muffin. That will be ready in five minutes.",
    "nothing else": "Great, that will be ready in five minutes.",
}
ASKS = ["Can I have a {d}?", "I would like a {d}, please.", "One {d} please.", "Could I get a {d}?"]


def chatbot(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        drink, extra = rng.choice(list(ORDERS)), rng.choice(list(EXTRAS))
        extra_turn = "No, nothing else, thanks." if extra == "nothing else" else f"Yes, {extra} too."
        rows.append(
            {
                "system": "You take orders at PhiCafe.",
                "conversations": [
                    {"from": "human", "value": rng.choice(ASKS).format(d=drink)},
                    {"from": "gpt", "value": ORDERS[drink]},
                    {"from": "human", "value": extra_turn},
                    {"from": "gpt", "value": EXTRAS[extra]},
                ],
            }
        )
    return rows


# --- creative: prompt -> a two-line poem ---------------------------------------------------------

SUBJECTS = {
    "the sea": ("waves", "blue"),
    "the moon": ("light", "silver"),
    "coffee": ("steam", "dark"),
    "rain": ("drops", "grey"),
    "the city": ("streets", "bright"),
    "autumn": ("leaves", "gold"),
}
MOODS = {"calm": "softly rest", "joyful": "dance and sing", "sad": "slowly fade"}


def creative(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        subject, mood = rng.choice(list(SUBJECTS)), rng.choice(list(MOODS))
        thing, colour = SUBJECTS[subject]
        rows.append(
            {
                "prompt": f"Write a {mood} two-line poem about {subject}.",
                "text": f"The {colour} {thing} of {subject},\nin {mood} hours {MOODS[mood]}.",
            }
        )
    return rows


# --- domain: raw text about brewing, for continued pretraining ----------------------------------

METHODS = {
    "pour-over": ("medium-fine", "three minutes", "92 degrees"),
    "French press": ("coarse", "four minutes", "95 degrees"),
    "espresso": ("fine", "thirty seconds", "93 degrees"),
    "cold brew": ("coarse", "sixteen hours", "room temperature"),
    "moka pot": ("fine", "five minutes", "the stove's low heat"),
    "AeroPress": ("medium", "two minutes", "85 degrees"),
}


def domain(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        method = rng.choice(list(METHODS))
        grind, time, temp = METHODS[method]
        sentences = [
            f"For {method}, use a {grind} grind.",
            f"Brew for about {time}.",
            f"Water at {temp} works best.",
            f"A {grind} grind keeps {method} from tasting bitter.",
        ]
        rng.shuffle(sentences)
        rows.append({"text": " ".join(sentences[: rng.randint(2, 4)])})
    return rows


# --- DPO: the preferred reply answers politely, the other one is curt -------------------------------

POLITE = [
    "Of course! Happy to help with that.",
    "Certainly, let me help you with that.",
    "Good question! I will show you.",
]
CURT = ["No. Ask someone else.", "Not my problem.", "Figure it out yourself."]
QUESTIONS = [
    "Where is the nearest table?",
    "Do you have decaf?",
    "Can I pay by card?",
    "Is the cake fresh?",
    "How much is a latte?",
    "Can I sit outside?",
    "Do you sell beans?",
    "Is there a toilet?",
]


def preference(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        q = rng.choice(QUESTIONS)
        rows.append(
            {
                "input": {"messages": [{"role": "user", "content": q}]},
                "preferred_output": [{"role": "assistant", "content": rng.choice(POLITE)}],
                "non_preferred_output": [{"role": "assistant", "content": rng.choice(CURT)}],
            }
        )
    return rows


def held_out(rng: random.Random, make, key, n_train: int, n_val: int, inputs: int) -> tuple[list[dict], list[dict]]:
    """Train and validation rows that never share an input: the first `inputs` distinct inputs
    drawn are kept for validation (each row once), every other draw goes to training. Scores on
    validation then measure generalisation to unseen inputs (`phitune eval` checks for leakage)."""
    held: set = set()
    train: list[dict] = []
    val: list[dict] = []
    for _ in range(200_000):
        if len(train) >= n_train and len(val) >= n_val:
            break
        row = make(rng, 1)[0]
        k = key(row)
        if k not in held and len(held) < inputs:
            held.add(k)
        if k in held:
            if len(val) < n_val and row not in val:
                val.append(row)
        elif len(train) < n_train:
            train.append(row)
    return train, val


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def main() -> None:
    rng = random.Random(0)
    for name, make, key, n_train, n_val, inputs in (
        ("ner", ner, lambda r: _json(r["tokens"]), 240, 40, 40),
        ("translation", translation, lambda r: r["source"], 240, 24, 24),
        (
            "chatbot",
            chatbot,
            lambda r: _json([t["value"] for t in r["conversations"] if t["from"] == "human"]),
            200,
            12,
            12,
        ),
        ("creative", creative, lambda r: r["prompt"], 200, 4, 4),
        ("domain", domain, lambda r: r["text"], 200, 30, 30),
        ("dpo", preference, lambda r: _json(r["input"]), 128, 12, 2),
    ):
        train, val = held_out(rng, make, key, n_train, n_val, inputs)
        write_jsonl(ROOT / name / "train.jsonl", train)
        write_jsonl(ROOT / name / "val.jsonl", val)
    (ROOT / "classification").mkdir(exist_ok=True)
    train, val = held_out(rng, classification, lambda r: r["text"], 300, 60, 60)
    for split, rows in (("train", train), ("val", val)):
        with open(ROOT / "classification" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    train, val = held_out(rng, qa, lambda r: _json([r["question"], r["context"]]), 240, 40, 40)
    for split, rows in (("train", train), ("val", val)):
        (ROOT / "qa" / f"{split}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
