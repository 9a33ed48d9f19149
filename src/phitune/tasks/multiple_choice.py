"""Multiple choice (MMLU / TruthfulQA style), evaluation only: each choice scored by its
log-likelihood (`evaluate/choice.py` reads the rows and runs the model), reported as accuracy and
TruthfulQA's MC1 / MC2."""

from phitune.tasks.base import Task

TASK = Task("multiple_choice", metrics=("accuracy", "mc1", "mc2"), primary="accuracy", own_evaluator=True)
