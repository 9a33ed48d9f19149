"""Task presets: structured rows -> training samples, and the task description evaluation reads.

A preset names the columns it reads (`task.fields` maps them to yours), writes the prompt, and
records in `TaskSpec` what evaluation needs (label set, entity types, language pair, prompt
wording). Generative presets produce `Chat` samples; with `task.head: true`, classification and
NER produce `Labelled` / `Tagged` samples for a classification head instead.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from phitune.data.formats import FormatOptions, Labelled, Tagged, _need, _not_object, _prompt_reply
from phitune.registry import TASKS

if TYPE_CHECKING:
    from phitune.config import TaskConfig


@dataclass
class TaskSpec:
    name: str = "none"
    head: bool = False
    labels: list[str] = field(default_factory=list)  # class labels, or NER entity types
    instruction: str | None = None
    source_language: str | None = None
    target_language: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)

    @property
    def tag_labels(self) -> list[str]:
        """BIO tag set of a token-classification head: O, then B-/I- per entity type."""
        return ["O"] + [f"{p}-{t}" for t in self.labels for p in ("B", "I")]

    @property
    def head_labels(self) -> list[str]:
        return self.tag_labels if self.name == "ner" else self.labels

    @property
    def model_head(self) -> tuple[str, list[str] | None]:
        """(causal | sequence | token, the head's labels or None): what model class to load."""
        if not self.head:
            return "causal", None
        return ("token" if self.name == "ner" else "sequence"), self.head_labels

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TaskSpec":
        return cls(**json.loads(text))


def make_spec(task_cfg: TaskConfig, rows: list, opts: FormatOptions) -> TaskSpec:
    """The spec for this run; classification labels and NER types come from the training rows
    (sorted) unless `task.labels` lists them."""
    name = task_cfg.name if task_cfg else "none"
    task = TASKS[name]
    spec = TaskSpec(name=name, head=bool(task_cfg and task_cfg.head), metrics=list(task.metrics))
    if task_cfg is None or not task.fields:
        return spec
    spec.fields = dict(task_cfg.fields or {})
    spec.instruction = task_cfg.instruction or task.instruction
    spec.source_language, spec.target_language = task_cfg.source_language, task_cfg.target_language
    if name == "translation" and spec.instruction:
        spec.instruction = spec.instruction.format(
            source_language=spec.source_language, target_language=spec.target_language
        )
    if task_cfg.labels:
        spec.labels = list(task_cfg.labels)
    elif name == "classification":
        spec.labels = sorted(
            {
                _label(r.value.get(spec.fields.get("label", "label")))
                for r in rows
                if isinstance(r.value, dict) and _label_ok(r.value.get(spec.fields.get("label", "label")))
            }
        )
    elif name == "ner":
        types = set()
        for r in rows:
            if not isinstance(r.value, dict):
                continue
            tags = r.value.get(spec.fields.get("tags", "tags"))
            ents = r.value.get(spec.fields.get("entities", "entities"))
            if isinstance(tags, list):
                types |= {t[2:] for t in tags if isinstance(t, str) and t[:2] in ("B-", "I-")}
            if isinstance(ents, list):
                types |= {e["label"] for e in ents if isinstance(e, dict) and isinstance(e.get("label"), str)}
        spec.labels = sorted(types)
    return spec


def _label_ok(value) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip() != ""


def _label(value) -> str:
    return str(value).strip()


def _get(row: dict, spec: TaskSpec, name: str):
    return row.get(spec.fields.get(name, name))


def _col(spec: TaskSpec, name: str) -> str:
    return spec.fields.get(name, name)


# --- presets ----------------------------------------------------------------------------------


def classification(row: dict, where: str, spec: TaskSpec, opts: FormatOptions) -> tuple[object, list[str]]:
    problems = _not_object(row, where, '{"text": "...", "label": "..."}')
    if problems:
        return None, problems
    problems = _need(row, where, _col(spec, "text"))
    raw = _get(row, spec, "label")
    if _col(spec, "label") not in row:
        problems.append(f"{where}: missing key '{_col(spec, 'label')}' (the class label)")
    elif not _label_ok(raw):
        problems.append(f"{where}: '{_col(spec, 'label')}' must be a non-empty string or integer, got {raw!r}")
    elif _label(raw) not in spec.labels:
        problems.append(
            f"{where}: label {_label(raw)!r} is not in task.labels ({', '.join(spec.labels)}); add it or fix the row"
        )
    if problems:
        return None, problems
    text, label = _get(row, spec, "text"), _label(raw)
    if spec.head:
        return Labelled(text, label), []
    prompt = f"{spec.instruction}\nAnswer with one of: {', '.join(spec.labels)}.\n\nText: {text}"
    return _prompt_reply(prompt, label, opts), []


def ner(row: dict, where: str, spec: TaskSpec, opts: FormatOptions) -> tuple[object, list[str]]:
    """`tokens` + BIO `tags`, or `text` + `entities` ([{start, end, label}], character offsets)."""
    problems = _not_object(row, where, '{"tokens": [...], "tags": [...]}')
    if problems:
        return None, problems
    if _col(spec, "tokens") in row or _col(spec, "tags") in row:
        tokens, tags = _get(row, spec, "tokens"), _get(row, spec, "tags")
        problems = check_bio(tokens, tags, where, spec)
    elif _col(spec, "text") in row:
        problems = _need(row, where, _col(spec, "text"))
        if not problems:
            tokens, tags, problems = spans_to_bio(_get(row, spec, "text"), _get(row, spec, "entities"), where, spec)
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
    return _prompt_reply(prompt, json.dumps(entities, ensure_ascii=False), opts), []


def check_bio(tokens: object, tags: object, where: str, spec: TaskSpec) -> list[str]:
    t_key, g_key = _col(spec, "tokens"), _col(spec, "tags")
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
    e_key = _col(spec, "entities")
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


def bio_entities(tokens: list[str], tags: list[str]) -> list[tuple[list[str], str]]:
    out: list[tuple[list[str], str]] = []
    for tok, tag in zip(tokens, tags):
        if tag.startswith("B-"):
            out.append(([tok], tag[2:]))
        elif tag.startswith("I-") and out:
            out[-1][0].append(tok)
    return out


def missing_columns(name: str, spec: TaskSpec, rows: list, path: str) -> str | None:
    """One problem for a file in which no row has a column the preset needs (instead of the same
    error on every row), naming the file's columns and the `task.fields` mapping that fixes it."""
    columns = list(dict.fromkeys(k for r in rows if isinstance(r.value, dict) for k in r.value))
    if not columns:
        return None
    gaps = [[f for f in alt if _col(spec, f) not in columns] for alt in TASKS[name].required]
    if any(not gap for gap in gaps):
        return None
    gap = min(gaps, key=len)
    unused = [c for c in columns if c not in {_col(spec, f) for f in TASKS[name].fields}]
    mapping = ", ".join(f"{f}: {_closest_column(f, unused)}" for f in gap)
    missing = " and ".join(f"'{_col(spec, f)}'" for f in gap)
    return (
        f"{path}: no row has the column{'s' * (len(gap) > 1)} {missing} that the {name} preset reads; the file's "
        f"columns are {', '.join(columns)}: rename {'them' if len(gap) > 1 else 'it'} or map yours with "
        f"task.fields: {{{mapping}}}"
    )


# Column names datasets use for a preset's fields (the closest column when names differ).
SYNONYMS = {
    "label": ("sentiment", "class", "category", "labels", "target", "y", "intent", "topic", "rating"),
    "text": ("sentence", "review", "content", "document", "input", "body", "comment", "tweet", "utterance"),
    "source": ("src", "en", "english", "input"),
    "target": ("tgt", "translation", "output"),
    "question": ("query", "q", "prompt"),
    "answer": ("answers", "a", "response", "output"),
}


def _closest_column(field_name: str, columns: list[str]) -> str:
    import difflib

    lowered = {c.lower(): c for c in columns}
    for synonym in SYNONYMS.get(field_name, ()):
        if synonym in lowered:
            return lowered[synonym]
    close = difflib.get_close_matches(field_name, columns, n=1, cutoff=0.6)
    return close[0] if close else "<column>"


def _required(row, where: str, spec: TaskSpec, example: str, fields: tuple[str, ...]) -> list[str]:
    """The row is an object holding every field as a non-empty string (problems, else [])."""
    return _not_object(row, where, example) or [p for f in fields for p in _need(row, where, _col(spec, f))]


def translation(row: dict, where: str, spec: TaskSpec, opts: FormatOptions) -> tuple[object, list[str]]:
    problems = _required(row, where, spec, '{"source": "...", "target": "..."}', ("source", "target"))
    if problems:
        return None, problems
    return _prompt_reply(f"{spec.instruction}\n\n{_get(row, spec, 'source')}", _get(row, spec, "target"), opts), []


def qa(row: dict, where: str, spec: TaskSpec, opts: FormatOptions) -> tuple[object, list[str]]:
    problems = _required(
        row, where, spec, '{"question": "...", "context": "...", "answer": "..."}', ("question", "answer")
    )
    context = _get(row, spec, "context") if isinstance(row, dict) else None
    if context is not None and not isinstance(context, str):
        problems.append(f"{where}: '{_col(spec, 'context')}' must be a string, got {type(context).__name__}")
    if problems:
        return None, problems
    body = (
        f"Context: {context}\n\n" if context and context.strip() else ""
    ) + f"Question: {_get(row, spec, 'question')}"
    return _prompt_reply(f"{spec.instruction}\n\n{body}", _get(row, spec, "answer"), opts), []


def creative(row: dict, where: str, spec: TaskSpec, opts: FormatOptions) -> tuple[object, list[str]]:
    problems = _required(row, where, spec, '{"prompt": "...", "text": "..."}', ("prompt", "text"))
    if problems:
        return None, problems
    return _prompt_reply(_get(row, spec, "prompt"), _get(row, spec, "text"), opts), []


PRESETS: dict[str, Any] = {
    "classification": classification,
    "ner": ner,
    "translation": translation,
    "qa": qa,
    "creative": creative,
}
