"""Creative generation: a prompt and the text it should produce, scored by ROUGE-L against the
reference and distinct-2 (how varied the writing is)."""

from __future__ import annotations

from typing import Any

import phitune.tasks.metrics as metrics
from phitune.samples import FormatOptions, prompt_reply
from phitune.tasks.base import Converted, Task, TaskSpec, required, value


class Creative(Task):
    def to_sample(self, row: Any, where: str, spec: TaskSpec, opts: FormatOptions) -> Converted:
        problems = required(row, where, spec, '{"prompt": "...", "text": "..."}', ("prompt", "text"))
        if problems:
            return None, problems
        return prompt_reply(value(row, spec, "prompt"), value(row, spec, "text"), opts), []

    def score(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
        return metrics.rouge_l(predictions, references) | metrics.distinct_n(predictions, 2)


TASK = Creative(
    "creative",
    fields=("prompt", "text"),
    required=(("prompt", "text"),),
    metrics=("rouge_l", "distinct_2"),
    generative=True,
    primary="rouge_l",
)
