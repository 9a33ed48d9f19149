"""What a task is: the `Task` every module of this package defines one of, and the `TaskSpec` a
run records (OUT/task.json) so that evaluation asks and scores exactly as training did.

A task says which columns its preset reads and turns a row into a sample (`to_sample`), finds its
labels in the training rows (`infer_labels`), scores generated answers (`score`) or a head's
predictions (`score_head`), and names the metric it is judged by. The defaults below are those of
a task without a preset (`none`): the data format decides the samples, perplexity judges.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import phitune.tasks.metrics as metrics
from phitune.samples import FormatOptions, Plain, need, not_object


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TaskSpec":
        return cls(**json.loads(text))


class TaskSettings(Protocol):
    """The `task:` section of a config as a task reads it (config.TaskConfig; the config package
    depends on this one, not the other way round)."""

    @property
    def name(self) -> str: ...
    @property
    def head(self) -> bool: ...
    @property
    def labels(self) -> list[str] | None: ...
    @property
    def instruction(self) -> str | None: ...
    @property
    def source_language(self) -> str | None: ...
    @property
    def target_language(self) -> str | None: ...
    @property
    def fields(self) -> Mapping[str, str] | None: ...


Sample = Any  # one of phitune.samples' types
Converted = tuple[Sample | None, list[str]]  # (sample, or None with the row's problems)


@dataclass(frozen=True)
class Task:
    name: str
    # The columns its preset reads (task.fields maps them to yours); empty: no preset.
    fields: tuple[str, ...] = ()
    # The column sets a row cannot do without (any one of them).
    required: tuple[tuple[str, ...], ...] = ()
    instruction: str | None = None
    # Without a preset: the data formats it trains from (None: any).
    formats: tuple[str, ...] | None = None
    # The kind of classification head `task.head: true` gives it (sequence | token), or None.
    head_kind: str | None = None
    # What evaluation reports for it; for a generative task, what `score` returns, in that order.
    metrics: tuple[str, ...] = ("perplexity",)
    generative: bool = False  # scored on generated answers (the others from the loss or log-likelihoods)
    primary: str = "perplexity"  # the metric the task is judged by (best checkpoint, reports)
    preference: bool = False  # may train on preference pairs (method.objective: dpo)
    # Scored by an evaluator of its own on its own rows (multiple_choice), not through samples.
    own_evaluator: bool = False

    # --- data --------------------------------------------------------------------------------

    def spec(self, settings: TaskSettings | None, rows: list) -> TaskSpec:
        """The spec of a run; labels come from the training rows unless task.labels lists them."""
        spec = TaskSpec(name=self.name, head=bool(settings and settings.head), metrics=list(self.metrics))
        if settings is None or not self.fields:
            return spec
        spec.fields = dict(settings.fields or {})
        spec.source_language, spec.target_language = settings.source_language, settings.target_language
        spec.instruction = self.instruction_for(settings.instruction or self.instruction, spec)
        spec.labels = list(settings.labels) if settings.labels else self.infer_labels(rows, spec)
        return spec

    def instruction_for(self, instruction: str | None, spec: TaskSpec) -> str | None:
        return instruction

    def infer_labels(self, rows: list, spec: TaskSpec) -> list[str]:
        return []

    def to_sample(self, row: Any, where: str, spec: TaskSpec, opts: FormatOptions) -> Converted:
        """A row of the preset's columns -> a sample (only tasks with `fields` have a preset)."""
        raise NotImplementedError(f"task {self.name} has no preset; the data format converts its rows")

    def sample_label(self, sample: Sample) -> str | None:
        """The class a training sample teaches (for label counts and warnings), or None."""
        return None

    def head_labels(self, spec: TaskSpec) -> list[str]:
        """The labels of its classification head's outputs, in order."""
        return spec.labels

    def config_problems(self, settings: TaskSettings, data_format: str | None) -> list[tuple[str, str]]:
        """Problems of the task's own settings: (key path, message with the fix)."""
        return []

    # --- scoring -------------------------------------------------------------------------------

    def score(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
        """Generated answers -> the task's metrics: overlap with the reference reply."""
        exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)
        return metrics.rouge_l(predictions, references) | {"exact_match": exact}

    def score_head(self, spec: TaskSpec, samples: list, predicted: list) -> tuple[dict, list[tuple]]:
        """A head's predicted ids -> (metrics, (input, reference, prediction) per sample)."""
        raise NotImplementedError(f"task {self.name} has no classification head")


# --- what the presets share ---------------------------------------------------------------------


def column(spec: TaskSpec, name: str) -> str:
    """The row's column for the preset's field `name` (task.fields maps it)."""
    return spec.fields.get(name, name)


def value(row: dict, spec: TaskSpec, name: str) -> Any:
    return row.get(column(spec, name))


def required(row: Any, where: str, spec: TaskSpec, example: str, names: tuple[str, ...]) -> list[str]:
    """The row is an object holding every field as a non-empty string (problems, else [])."""
    return not_object(row, where, example) or [p for f in names for p in need(row, where, column(spec, f))]


def missing_columns(task: Task, spec: TaskSpec, rows: list, path: str) -> str | None:
    """One problem for a file in which no row has a column the preset needs (instead of the same
    error on every row), naming the file's columns and the `task.fields` mapping that fixes it."""
    columns = list(dict.fromkeys(k for r in rows if isinstance(r.value, dict) for k in r.value))
    if not columns:
        return None
    gaps = [[f for f in alt if column(spec, f) not in columns] for alt in task.required]
    if any(not gap for gap in gaps):
        return None
    gap = min(gaps, key=len)
    unused = [c for c in columns if c not in {column(spec, f) for f in task.fields}]
    mapping = ", ".join(f"{f}: {_closest_column(f, unused)}" for f in gap)
    missing = " and ".join(f"'{column(spec, f)}'" for f in gap)
    return (
        f"{path}: no row has the column{'s' * (len(gap) > 1)} {missing} that the {task.name} preset reads; the "
        f"file's columns are {', '.join(columns)}: rename {'them' if len(gap) > 1 else 'it'} or map yours with "
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
    lowered = {c.lower(): c for c in columns}
    for synonym in SYNONYMS.get(field_name, ()):
        if synonym in lowered:
            return lowered[synonym]
    close = difflib.get_close_matches(field_name, columns, n=1, cutoff=0.6)
    return close[0] if close else "<column>"


def reply_of(sample: Sample) -> str:
    """The trained answer of a generative sample (the completion, or the last message)."""
    return sample.completion if isinstance(sample, Plain) else sample.messages[-1]["content"]
