"""Named-entity recognition: words with BIO tags, or text with character-offset entities.
Answered as a JSON list of {"text", "type"} objects or, with `task.head: true`, by a
token-classification head (one tag per word). Scored by entity F1 over exact spans."""

from __future__ import annotations

import json
from typing import Any

import phitune.tasks.metrics as metrics
from phitune.samples import FormatOptions, Tagged, need, not_object, prompt_reply
from phitune.tasks.base import Converted, Task, TaskSpec, column, value


def tag_labels(entity_types: list[str]) -> list[str]:
    """BIO tag set of a token-classification head: O, then B-/I- per entity type."""
    return ["O"] + [f"{p}-{t}" for t in entity_types for p in ("B", "I")]


def bio_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) of each entity in a BIO sequence; a stray I- starts one (seqeval's default)."""
    spans: set[tuple[int, int, str]] = set()
    start: int | None = None
    kind = ""
    for i, tag in enumerate(tags + ["O"]):
        if start is not None and not (tag.startswith("I-") and tag[2:] == kind):
            spans.add((start, i, kind))
            start = None
        if tag.startswith("B-") or (tag.startswith("I-") and start is None):
            start, kind = i, tag[2:]
    return spans


def bio_entities(tokens: list[str], tags: list[str]) -> list[tuple[list[str], str]]:
    out: list[tuple[list[str], str]] = []
    for tok, tag in zip(tokens, tags):
        if tag.startswith("B-"):
            out.append(([tok], tag[2:]))
        elif tag.startswith("I-") and out:
            out[-1][0].append(tok)
    return out


def check_bio(tokens: object, tags: object, where: str, spec: TaskSpec) -> list[str]:
    t_key, g_key = column(spec, "tokens"), column(spec, "tags")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        return [f"{where}: '{t_key}' must be a non-empty list of non-empty strings"]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return [f"{where}: '{g_key}' must be a list of BIO tag strings (O, B-TYPE, I-TYPE)"]
    if len(tags) != len(tokens):
        return [f"{where}: {len(tokens)} tokens but {len(tags)} tags; give one tag per token"]
    out = []
    for i, tag in enumerate(tags):
        if tag != "O" and (tag[:2] not in ("B-", "I-") or not tag[2:]):
            out.append(f"{where}: {g_key}[{i}] = {tag!r} is not a BIO tag; use O, B-TYPE or I-TYPE")
        elif tag != "O" and tag[2:] not in spec.labels:
            out.append(
                f"{where}: {g_key}[{i}]: entity type {tag[2:]!r} is not in task.labels ({', '.join(spec.labels)})"
            )
        elif tag.startswith("I-") and (i == 0 or tags[i - 1][2:] != tag[2:] or tags[i - 1] == "O"):
            out.append(
                f"{where}: {g_key}[{i}] = {tag!r} does not continue an entity of that type; start it with B-{tag[2:]}"
            )
    return out


def spans_to_bio(
    text: str, entities: object, where: str, spec: TaskSpec
) -> tuple[list[str] | None, list[str] | None, list[str]]:
    """Whitespace words; a word is in an entity when they overlap. Spans must cover whole words."""
    e_key = column(spec, "entities")
    if not isinstance(entities, list):
        return None, None, [f"{where}: '{e_key}' must be a list of {{start, end, label}} objects"]
    words, pos = [], 0
    for w in text.split():
        start = text.index(w, pos)
        words.append((start, start + len(w), w))
        pos = start + len(w)
    tags = ["O"] * len(words)
    problems = []
    for k, e in enumerate(entities):
        if not (
            isinstance(e, dict)
            and isinstance(e.get("start"), int)
            and isinstance(e.get("end"), int)
            and isinstance(e.get("label"), str)
        ):
            problems.append(f'{where}: {e_key}[{k}] must be {{"start": int, "end": int, "label": str}}')
            continue
        s, t = e["start"], e["end"]
        if not 0 <= s < t <= len(text):
            problems.append(f"{where}: {e_key}[{k}]: span {s}..{t} is outside the text (length {len(text)})")
            continue
        if e["label"] not in spec.labels:
            problems.append(
                f"{where}: {e_key}[{k}]: entity type {e['label']!r} is not in task.labels ({', '.join(spec.labels)})"
            )
            continue
        inside = [i for i, (a, b, _) in enumerate(words) if a < t and s < b]
        if not inside or words[inside[0]][0] != s or words[inside[-1]][1] != t:
            problems.append(f"{where}: {e_key}[{k}]: span {s}..{t} ({text[s:t]!r}) does not cover whole words")
            continue
        for j, i in enumerate(inside):
            tags[i] = ("B-" if j == 0 else "I-") + e["label"]
    return [w for _, _, w in words], tags, problems


class NER(Task):
    def infer_labels(self, rows: list, spec: TaskSpec) -> list[str]:
        types = set()
        for r in rows:
            if not isinstance(r.value, dict):
                continue
            tags, ents = value(r.value, spec, "tags"), value(r.value, spec, "entities")
            if isinstance(tags, list):
                types |= {t[2:] for t in tags if isinstance(t, str) and t[:2] in ("B-", "I-")}
            if isinstance(ents, list):
                types |= {e["label"] for e in ents if isinstance(e, dict) and isinstance(e.get("label"), str)}
        return sorted(types)

    def to_sample(self, row: Any, where: str, spec: TaskSpec, opts: FormatOptions) -> Converted:
        """`tokens` + BIO `tags`, or `text` + `entities` ([{start, end, label}], character offsets)."""
        problems = not_object(row, where, '{"tokens": [...], "tags": [...]}')
        if problems:
            return None, problems
        if column(spec, "tokens") in row or column(spec, "tags") in row:
            tokens, tags = value(row, spec, "tokens"), value(row, spec, "tags")
            problems = check_bio(tokens, tags, where, spec)
        elif column(spec, "text") in row:
            problems = need(row, where, column(spec, "text"))
            if not problems:
                tokens, tags, problems = spans_to_bio(
                    value(row, spec, "text"), value(row, spec, "entities"), where, spec
                )
        else:
            problems = [
                f"{where}: expected 'tokens' + 'tags' (BIO) or 'text' + 'entities' (character spans); "
                f"keys present: {', '.join(sorted(map(str, row))) or 'none'}"
            ]
        if problems:
            return None, problems
        if spec.head:
            return Tagged(tokens, tags), []
        entities = [{"text": " ".join(words), "type": kind} for words, kind in bio_entities(tokens, tags)]
        prompt = f"{spec.instruction}\nEntity types: {', '.join(spec.labels)}.\n\nText: {' '.join(tokens)}"
        return prompt_reply(prompt, json.dumps(entities, ensure_ascii=False), opts), []

    def head_labels(self, spec: TaskSpec) -> list[str]:
        return tag_labels(spec.labels)

    def score(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
        parsed = [metrics.parse_entities(p) for p in predictions]
        refs = [metrics.parse_entities(r) or [] for r in references]
        ents = metrics.entities([p or [] for p in parsed], refs)
        return {
            "entity_f1": ents["f1"],
            "entity_precision": ents["precision"],
            "entity_recall": ents["recall"],
            "valid_json": sum(p is not None for p in parsed) / max(len(parsed), 1),
        }

    def score_head(self, spec: TaskSpec, samples: list, predicted: list) -> tuple[dict, list[tuple]]:
        tags = self.head_labels(spec)
        gold = [bio_spans(s.tags) for s in samples]
        pred = [bio_spans([tags[t] for t in ids]) for ids in predicted]
        ents = metrics.entities([sorted(p) for p in pred], [sorted(g) for g in gold])
        values = {"entity_f1": ents["f1"], "entity_precision": ents["precision"], "entity_recall": ents["recall"]}
        shown = [
            (" ".join(s.tokens), " ".join(s.tags), " ".join(tags[t] for t in ids)) for s, ids in zip(samples, predicted)
        ]
        return values, shown


TASK = NER(
    "ner",
    fields=("tokens", "tags", "text", "entities"),
    required=(("tokens", "tags"), ("text", "entities")),
    instruction='Extract the named entities from the text as a JSON list of {"text", "type"} objects, '
    "in order of appearance.",
    head_kind="token",
    metrics=("entity_f1", "entity_precision", "entity_recall", "valid_json"),
    generative=True,
    primary="entity_f1",
)
