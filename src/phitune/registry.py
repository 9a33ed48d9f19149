"""The names phitune accepts, each listed once: tasks (what a preset reads, how answers are
scored, which metric judges a run), methods, data formats, dtypes and backends.

The config's `Literal`s, the CLI's choices, the data presets and the scoring all read these
tables, so a name added here is accepted everywhere at once. This module imports nothing of
phitune's: anything may depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    head: bool = False  # task.head: true (a classification head) is allowed
    trainable: bool = True  # False: an evaluation-only task (phitune eval, compare)
    # What evaluation reports for it; for a generative task, what `scoring.score` returns from
    # its generated answers, in that order.
    metrics: tuple[str, ...] = ("perplexity",)
    generative: bool = False  # scored on generated answers (the others from the loss or log-likelihoods)
    primary: str = "perplexity"  # the metric the task is judged by (best checkpoint, reports)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("none"),
        Task(
            "chat",
            formats=("chat", "sharegpt", "prompt_completion", "alpaca"),
            metrics=("rouge_l", "exact_match"),
            generative=True,
            primary="rouge_l",
        ),
        Task(
            "classification",
            fields=("text", "label"),
            required=(("text", "label"),),
            instruction="Classify the text.",
            head=True,
            metrics=("accuracy", "macro_f1", "valid_label"),
            generative=True,
            primary="accuracy",
        ),
        Task(
            "ner",
            fields=("tokens", "tags", "text", "entities"),
            required=(("tokens", "tags"), ("text", "entities")),
            instruction='Extract the named entities from the text as a JSON list of {"text", "type"} objects, '
            "in order of appearance.",
            head=True,
            metrics=("entity_f1", "entity_precision", "entity_recall", "valid_json"),
            generative=True,
            primary="entity_f1",
        ),
        Task(
            "translation",
            fields=("source", "target"),
            required=(("source", "target"),),
            instruction="Translate from {source_language} to {target_language}.",
            metrics=("bleu", "chrf"),
            generative=True,
            primary="chrf",
        ),
        Task(
            "qa",
            fields=("question", "context", "answer"),
            required=(("question", "answer"),),
            instruction="Answer the question.",
            metrics=("exact_match", "token_f1"),
            generative=True,
            primary="token_f1",
        ),
        Task(
            "creative",
            fields=("prompt", "text"),
            required=(("prompt", "text"),),
            metrics=("rouge_l", "distinct_2"),
            generative=True,
            primary="rouge_l",
        ),
        Task("domain", formats=("text",)),
        Task("multiple_choice", trainable=False, metrics=("accuracy", "mc1", "mc2"), primary="accuracy"),
    )
}
TRAINABLE_TASKS = tuple(name for name, t in TASKS.items() if t.trainable)
EVAL_TASKS = tuple(TASKS)
# Tasks whose metric needs generated answers (the others are scored from the loss alone).
GENERATIVE_TASKS = tuple(name for name, t in TASKS.items() if t.generative)
HEAD_TASKS = tuple(name for name, t in TASKS.items() if t.head)

METHODS = ("full", "lora", "dora", "qlora", "ia3", "prompt_tuning")
ADAPTER_METHODS = METHODS[1:]
DATA_FORMATS = ("auto", "chat", "prompt_completion", "alpaca", "sharegpt", "text", "template", "preference")
DTYPES = ("float32", "bfloat16", "float16")  # weights on disk and in memory
BACKENDS = ("torch", "onnx")
