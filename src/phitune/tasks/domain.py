"""Domain adaptation (continued pretraining): raw text, packed, judged by perplexity."""

from __future__ import annotations

from phitune.tasks.base import Task, TaskSettings


class Domain(Task):
    def config_problems(self, settings: TaskSettings, data_format: str | None) -> list[tuple[str, str]]:
        if data_format not in (None, "auto", "text"):
            return [("data.format", f"task.name domain trains raw text; use data.format text (got {data_format})")]
        return []


TASK = Domain("domain", formats=("text",))
