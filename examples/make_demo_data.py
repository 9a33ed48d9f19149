"""Regenerate examples/data/support_{train,val}.jsonl: a café support bot in OpenAI chat format.

Eight intents, each asked in many phrasings, each answered with one fixed reply, so that a short
LoRA run has something learnable and the held-out set (unseen phrasings combinations) can be
scored by exact match. Deterministic: `python examples/make_demo_data.py` rewrites the same files.
"""

import json
import random
from pathlib import Path

INTENTS = {
    "We are open from 7 am to 7 pm, Monday to Saturday.": [
        "when do you open",
        "what are your opening hours",
        "are you open on saturday",
        "what time do you close",
        "how late are you open",
        "when are you open today",
    ],
    "You can get a full refund within 30 days. Please keep your receipt.": [
        "can I get my money back",
        "how do refunds work",
        "I want a refund",
        "what is your refund policy",
        "can I return my order",
        "my drink was wrong, can I get a refund",
    ],
    "The wifi network is PhiCafe and the password is on your receipt.": [
        "what is the wifi password",
        "do you have wifi",
        "how do I connect to the internet",
        "is there free wifi",
        "which network should I join",
        "the wifi is not working for me",
    ],
    "Yes, we have oat, soy and almond milk at no extra cost.": [
        "do you have vegan milk",
        "is there oat milk",
        "can I get soy milk in my latte",
        "do you charge extra for almond milk",
        "I am vegan, what milk do you have",
        "do you have dairy free options",
    ],
    "We are at 12 Harbour Street, next to the library.": [
        "where are you",
        "what is your address",
        "how do I find the cafe",
        "where is the shop",
        "are you near the library",
        "which street are you on",
    ],
    "Deliveries arrive within 45 minutes of your order.": [
        "how long does delivery take",
        "when will my order arrive",
        "where is my delivery",
        "do you deliver quickly",
        "my order is late",
        "how fast is delivery",
    ],
    "You get one free drink for every ten stamps on your card.": [
        "how does the loyalty card work",
        "do you have a rewards program",
        "how many stamps for a free coffee",
        "what do I get for my stamps",
        "is there a loyalty scheme",
        "do stamps give free drinks",
    ],
    "All our pastries may contain nuts, so please ask the staff first.": [
        "do your pastries have nuts",
        "I have a nut allergy",
        "are the croissants nut free",
        "is it safe for allergies",
        "what allergens are in the cakes",
        "do you have nut free food",
    ],
}
OPENERS = ["", "Hi, ", "Hello! ", "Hey there. ", "Excuse me, ", "Good morning. ", "Quick question: "]
CLOSERS = ["?", "? Thanks!", "? Please help.", "? Thank you.", "?!", " please?"]
SYSTEM = "You are the PhiCafe assistant. Answer in one sentence."


def question(rng, phrasing):
    opener = rng.choice(OPENERS)
    text = opener + phrasing if opener else phrasing[0].upper() + phrasing[1:]
    return text + rng.choice(CLOSERS)


def conversation(rng, with_system):
    turns = 2 if rng.random() < 0.2 else 1
    messages = [{"role": "system", "content": SYSTEM}] if with_system else []
    for _ in range(turns):
        reply, phrasings = rng.choice(list(INTENTS.items()))
        messages.append({"role": "user", "content": question(rng, rng.choice(phrasings))})
        messages.append({"role": "assistant", "content": reply})
    return {"messages": messages}


def main():
    rng = random.Random(1234)
    seen, train, val = set(), [], []
    while len(train) < 480 or len(val) < 40:
        ex = conversation(rng, with_system=rng.random() < 0.5)
        key = json.dumps(ex, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        # Held-out examples are single-turn, so exact match on the one reply is well defined.
        if len(val) < 40 and len(ex["messages"]) <= 3 and rng.random() < 0.15:
            val.append(ex)
        elif len(train) < 480:
            train.append(ex)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    for name, rows in (("support_train.jsonl", train), ("support_val.jsonl", val)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(train)} train and {len(val)} validation conversations to {out}")


if __name__ == "__main__":
    main()
