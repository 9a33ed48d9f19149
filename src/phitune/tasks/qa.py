"""Question answering, with or without a context passage, scored as SQuAD v1.1 is (exact match
and token F1 after its normalisation)."""

from __future__ import annotations

from typing import Any

import phitune.tasks.metrics as metrics
from phitune.samples import FormatOptions, prompt_reply
from phitune.tasks.base import Converted, Task, TaskSpec, column, required, value


class QA(Task):
    def to_sample(self, row: Any, where: str, spec: TaskSpec, opts: FormatOptions) -> Converted:
        problems = required(
            row, where, spec, '{"question": "...", "context": "...", "answer": "..."}', ("question", "answer")
        )
        context = value(row, spec, "context") if isinstance(row, dict) else None
        if context is not None and not isinstance(context, str):
            problems.append(f"{where}: '{column(spec, 'context')}' must be a string, got {type(context).__name__}")
        if problems:
            return None, problems
        body = (
            f"Context: {context}\n\n" if context and context.strip() else ""
        ) + f"Question: {value(row, spec, 'question')}"
        return prompt_reply(f"{spec.instruction}\n\n{body}", value(row, spec, "answer"), opts), []

    def score(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
        return metrics.qa(predictions, references)


TASK = QA(
    "qa",
    fields=("question", "context", "answer"),
    required=(("question", "answer"),),
    instruction="Answer the question.",
    metrics=("exact_match", "token_f1"),
    generative=True,
    primary="token_f1",
)
