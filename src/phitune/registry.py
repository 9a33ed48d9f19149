"""The names phitune accepts, each listed once: tasks, data formats, dtypes and backends (each method
names itself in methods/).

The config's `Literal`s and the CLI's choices read these tuples, so a name added here is accepted
everywhere at once; what a task or a method is lives in its own module (`tasks/`, `methods/`).
This module imports nothing of phitune's: anything may depend on it.
"""

from __future__ import annotations

# One module each in phitune/tasks/ (tasks/<name>.py defines what the task is).
TASK_NAMES = ("none", "chat", "classification", "ner", "translation", "qa", "creative", "domain", "multiple_choice")
EVAL_TASKS = TASK_NAMES
EVAL_ONLY_TASKS = ("multiple_choice",)  # phitune eval and compare score them; nothing trains on them
TRAINABLE_TASKS = tuple(name for name in TASK_NAMES if name not in EVAL_ONLY_TASKS)

DATA_FORMATS = ("auto", "chat", "prompt_completion", "alpaca", "sharegpt", "text", "template", "preference")
DTYPES = ("float32", "bfloat16", "float16")  # weights on disk and in memory
BACKENDS = ("torch", "onnx")
