"""The tasks: one module each (`tasks/<name>.py` defines `TASK`), found by the names that
`registry.TASK_NAMES` lists. Everything that depends on what a task is asks it here: its preset,
its labels, its head, how its answers are scored and which metric judges it."""

from __future__ import annotations

import importlib

from phitune.registry import TASK_NAMES
from phitune.tasks.base import Task, TaskSpec

TASKS: dict[str, Task] = {name: importlib.import_module(f"phitune.tasks.{name}").TASK for name in TASK_NAMES}
# Tasks whose metric needs generated answers (the others are scored from the loss alone).
GENERATIVE_TASKS = tuple(name for name, t in TASKS.items() if t.generative)
HEAD_TASKS = tuple(name for name, t in TASKS.items() if t.head_kind)


def model_head(spec: TaskSpec) -> tuple[str, list[str] | None]:
    """(causal | sequence | token, the head's labels or None): what model class to load."""
    task = TASKS[spec.name]
    if not spec.head or task.head_kind is None:
        return "causal", None
    return task.head_kind, task.head_labels(spec)


def score(spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
    """Generated answers -> the task's metrics (a flat dict of numbers, plus per-class details for
    classification), `TASKS[name].metrics` in that order. `phitune eval`, `phitune compare` and
    the evaluation during training all score here, so the numbers agree wherever they are shown."""
    return TASKS[spec.name].score(spec, predictions, references)


def primary_metric(spec: TaskSpec) -> str:
    """The metric a task is judged by (best checkpoint, the headline of a report)."""
    return TASKS[spec.name].primary


__all__ = ["GENERATIVE_TASKS", "HEAD_TASKS", "TASKS", "Task", "TaskSpec", "model_head", "primary_metric", "score"]
