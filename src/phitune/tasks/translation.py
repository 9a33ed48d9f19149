"""Translation: source and target text in a named language pair, scored by chrF (the primary
metric) and BLEU, both from sacrebleu."""

from __future__ import annotations

from typing import Any

import phitune.tasks.metrics as metrics
from phitune.samples import FormatOptions, prompt_reply
from phitune.tasks.base import Converted, Task, TaskSettings, TaskSpec, required, value


class Translation(Task):
    def instruction_for(self, instruction: str | None, spec: TaskSpec) -> str | None:
        if not instruction:
            return instruction
        return instruction.format(source_language=spec.source_language, target_language=spec.target_language)

    def to_sample(self, row: Any, where: str, spec: TaskSpec, opts: FormatOptions) -> Converted:
        problems = required(row, where, spec, '{"source": "...", "target": "..."}', ("source", "target"))
        if problems:
            return None, problems
        return prompt_reply(f"{spec.instruction}\n\n{value(row, spec, 'source')}", value(row, spec, "target"), opts), []

    def config_problems(self, settings: TaskSettings, data_format: str | None) -> list[tuple[str, str]]:
        if settings.source_language and settings.target_language:
            return []
        return [
            (
                "task.source_language",
                "translation needs task.source_language and task.target_language (e.g. English, French)",
            )
        ]

    def score(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
        return metrics.translation(predictions, references)


TASK = Translation(
    "translation",
    fields=("source", "target"),
    required=(("source", "target"),),
    instruction="Translate from {source_language} to {target_language}.",
    metrics=("bleu", "chrf"),
    generative=True,
    primary="chrf",
)
