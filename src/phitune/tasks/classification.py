"""Text classification: text and a label, answered in words (the label) or, with
`task.head: true`, by a sequence-classification head. Scored by accuracy and macro-F1; an answer
is the label it names, ignoring case and final punctuation."""

from __future__ import annotations

import string
from typing import Any

import phitune.tasks.metrics as metrics
from phitune.samples import FormatOptions, Labelled, need, not_object, prompt_reply
from phitune.tasks.base import Converted, Sample, Task, TaskSpec, column, reply_of, value


def label_ok(raw: object) -> bool:
    return isinstance(raw, (str, int)) and not isinstance(raw, bool) and str(raw).strip() != ""


def canonical_label(answer: str, labels: list[str]) -> str:
    """The label an answer names, ignoring case, surrounding space and final punctuation (the
    answer "Positive." is the label "positive"); any other answer stays itself and is wrong."""
    clean = answer.strip().strip(string.punctuation + " ").casefold()
    for label in labels:
        if clean == label.casefold():
            return label
    return answer.strip()


class Classification(Task):
    def infer_labels(self, rows: list, spec: TaskSpec) -> list[str]:
        key = column(spec, "label")
        return sorted(
            {str(r.value.get(key)).strip() for r in rows if isinstance(r.value, dict) and label_ok(r.value.get(key))}
        )

    def to_sample(self, row: Any, where: str, spec: TaskSpec, opts: FormatOptions) -> Converted:
        problems = not_object(row, where, '{"text": "...", "label": "..."}')
        if problems:
            return None, problems
        problems = need(row, where, column(spec, "text"))
        raw = value(row, spec, "label")
        if column(spec, "label") not in row:
            problems.append(f"{where}: missing key '{column(spec, 'label')}' (the class label)")
        elif not label_ok(raw):
            problems.append(f"{where}: '{column(spec, 'label')}' must be a non-empty string or integer, got {raw!r}")
        elif str(raw).strip() not in spec.labels:
            problems.append(
                f"{where}: label {str(raw).strip()!r} is not in task.labels ({', '.join(spec.labels)}); "
                "add it or fix the row"
            )
        if problems:
            return None, problems
        text, label = value(row, spec, "text"), str(raw).strip()
        if spec.head:
            return Labelled(text, label), []
        prompt = f"{spec.instruction}\nAnswer with one of: {', '.join(spec.labels)}.\n\nText: {text}"
        return prompt_reply(prompt, label, opts), []

    def sample_label(self, sample: Sample) -> str | None:
        return sample.label if isinstance(sample, Labelled) else reply_of(sample)

    def score(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
        named = [canonical_label(p, spec.labels) for p in predictions]
        out = metrics.classification(named, references, spec.labels)
        out["valid_label"] = sum(n in spec.labels for n in named) / max(len(predictions), 1)
        return out

    def score_head(self, spec: TaskSpec, samples: list, predicted: list) -> tuple[dict, list[tuple]]:
        labels = [spec.labels[i] for i in predicted]
        values = metrics.classification(labels, [s.label for s in samples], spec.labels)
        return values, [(s.text, s.label, p) for s, p in zip(samples, labels)]


TASK = Classification(
    "classification",
    fields=("text", "label"),
    required=(("text", "label"),),
    instruction="Classify the text.",
    head_kind="sequence",
    metrics=("accuracy", "macro_f1", "valid_label"),
    generative=True,
    primary="accuracy",
)
