"""Checks across fields and against the file system, run after every section parsed on its own."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from phitune.config.schema import (
    DataConfig,
    DistributedConfig,
    MethodConfig,
    ModelConfig,
    TaskConfig,
    TrainingConfig,
    looks_local,
    template_fields,
)
from phitune.methods import METHODS
from phitune.registry import TRAINABLE_TASKS
from phitune.tasks import HEAD_TASKS, TASKS

# What an evaluation during training can report (training.best_metric picks one).
EVAL_METRICS = tuple(
    dict.fromkeys(
        (
            "auto",
            "loss",
            "perplexity",
            "mean_token_accuracy",
            *(m for name in TRAINABLE_TASKS for m in TASKS[name].metrics),
            "reward_accuracy",
            "reward_margin",
        )
    )
)


def semantic_problems(sections: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks across fields and against the file system, on whichever sections parsed; each is
    (key path, message with the fix). Running them on partial configs lets one pass report all."""
    out: list[tuple[str, str]] = []
    # A missing or unparsable training section is checked as its defaults.
    t: TrainingConfig = sections.get("training", TrainingConfig())
    data: DataConfig | None = sections.get("data")
    model: ModelConfig | None = sections.get("model")
    method: MethodConfig | None = sections.get("method")
    task: TaskConfig = sections.get("task") or TaskConfig()
    out = _training_problems(t, data) + _path_problems(data, model)
    out += _template_problems(data) + _task_problems(data, task)
    if method is not None:
        out += _method_task_problems(data, task, method)
    out += _distributed_problems(sections.get("distributed"), method)
    return out + _compile_problems(t, method, sections.get("distributed"))


def _compile_problems(
    t: TrainingConfig, method: MethodConfig | None, d: DistributedConfig | None
) -> list[tuple[str, str]]:
    """training.compile: true where phitune does not compile (the layers would not be compiled)."""
    if t.compile is not True:
        return []
    why = None
    if t.gradient_checkpointing:
        why = "gradient_checkpointing"
    elif method is not None and (limit := METHODS[method.name].limits.get("compile")):
        why = f"method {method.name} ({limit})"
    elif d is not None and d.strategy in ("fsdp", "deepspeed"):
        why = f"distributed.strategy {d.strategy}"
    if why is None:
        return []
    return [("training.compile", f"true cannot be combined with {why}; set training.compile: false (or auto)")]


def _training_problems(t: TrainingConfig, data: DataConfig | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if t.max_steps is not None and t.epochs not in (None, "auto"):
        out.append(
            (
                "training.epochs",
                f"set either training.max_steps ({t.max_steps}) or training.epochs ({t.epochs:g}), not both",
            )
        )
    if t.batch_size != "auto" and t.batch_size % t.gradient_accumulation_steps:
        out.append(
            (
                "training.gradient_accumulation_steps",
                f"batch_size {t.batch_size} is not divisible by gradient_accumulation_steps "
                f"{t.gradient_accumulation_steps}; "
                "choose values where it divides",
            )
        )
    if data is not None:
        has_validation = bool(data.validation or data.validation_split)
        if t.early_stopping_patience and not (t.eval_every and has_validation):
            out.append(
                (
                    "training.early_stopping_patience",
                    "needs training.eval_every and a validation set (data.validation or data.validation_split)",
                )
            )
        elif t.eval_every and not has_validation:
            out.append(
                (
                    "training.eval_every",
                    "needs a validation set: set data.validation to a file or data.validation_split to e.g. 0.1",
                )
            )
        if t.keep_best and not (t.eval_every and has_validation):
            out.append(
                (
                    "training.keep_best",
                    "needs training.eval_every and a validation set (data.validation or data.validation_split)",
                )
            )
    if t.best_metric not in EVAL_METRICS:
        close = difflib.get_close_matches(t.best_metric, EVAL_METRICS, n=1)
        out.append(
            (
                "training.best_metric",
                f"unknown metric {t.best_metric!r}"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + f" (one of {', '.join(EVAL_METRICS)})",
            )
        )
    return out


def _path_problems(data: DataConfig | None, model: ModelConfig | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if data is not None:
        for key in ("train", "validation"):
            path = getattr(data, key)
            if path and not Path(path).exists():  # a file, or a datasets save_to_disk directory
                out.append((f"data.{key}", f"file not found: {path} (relative paths are resolved from {Path.cwd()})"))
    if model is not None and looks_local(model.name_or_path) and not Path(model.name_or_path).is_dir():
        name = model.name_or_path
        out.append(
            (
                "model.name_or_path",
                f"model directory not found: {name}; create one with `phitune create-model {name} --arch phi3 "
                "--preset tiny` or give a hub id",
            )
        )
    return out


def _distributed_problems(d: DistributedConfig | None, method: MethodConfig | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if d is None:
        return out
    limits = METHODS[method.name].limits if method is not None else {}
    if d.strategy == "fsdp" and "fsdp" in limits:
        out.append(("distributed.strategy", limits["fsdp"]))
    if d.strategy != "deepspeed":
        for key, default in (("offload_optimizer", "none"), ("offload_params", "none"), ("deepspeed_config", None)):
            if getattr(d, key) != default:
                out.append(
                    (
                        f"distributed.{key}",
                        f"only applies with distributed.strategy: deepspeed (strategy is {d.strategy})",
                    )
                )
        return out
    if d.offload_params == "cpu" and d.zero_stage != 3:
        out.append(
            ("distributed.offload_params", f"parameter offload needs zero_stage 3 (zero_stage is {d.zero_stage})")
        )
    if d.offload_optimizer == "cpu" and d.zero_stage == 0:
        out.append(("distributed.offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3"))
    if d.deepspeed_config and not Path(d.deepspeed_config).is_file():
        out.append(("distributed.deepspeed_config", f"file not found: {d.deepspeed_config}"))
    if d.zero_stage == 3 and "zero3" in limits:
        out.append(("distributed.zero_stage", limits["zero3"]))
    if "deepspeed" in limits:
        out.append(("distributed.strategy", limits["deepspeed"]))
    if method is not None and method.objective == "dpo" and d.zero_stage == 3 and "dpo_zero3" in limits:
        out.append(("distributed.zero_stage", limits["dpo_zero3"]))
    return out


def _template_problems(data: DataConfig | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if data is not None and data.format == "template":
        if not data.template or not data.completion_field:
            out.append(
                (
                    "data.template",
                    "format template needs data.template (a pattern with {fields}) and data.completion_field",
                )
            )
        elif data.completion_field not in template_fields(data.template):
            out.append(
                (
                    "data.completion_field",
                    f"{data.completion_field!r} is not a {{field}} of data.template "
                    f"(fields: {', '.join(template_fields(data.template)) or 'none'})",
                )
            )
    elif data is not None and (data.template or data.completion_field):
        out.append(
            (
                "data.template",
                "only used with data.format: template; set it or remove data.template / data.completion_field",
            )
        )
    return out


def _task_problems(data: DataConfig | None, task: TaskConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    structured = bool(TASKS[task.name].fields)
    if data is not None and structured and data.format != "auto":
        out.append(("data.format", f"task.name {task.name} reads its own columns; remove data.format ({data.format})"))
    if task.head and task.name not in HEAD_TASKS:
        out.append(
            ("task.head", f"a classification head exists for task.name {' or '.join(HEAD_TASKS)}, not {task.name}")
        )
    out += TASKS[task.name].config_problems(task, data.format if data is not None else None)
    if task.fields and structured:
        fields = TASKS[task.name].fields
        for key in task.fields:
            if key not in fields:
                out.append(
                    (f"task.fields.{key}", f"not a field of the {task.name} preset; its fields are {', '.join(fields)}")
                )
    return out


def _method_task_problems(data: DataConfig | None, task: TaskConfig, method: MethodConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if method.objective == "dpo":
        if not TASKS[task.name].preference or (data is not None and data.format not in ("auto", "preference")):
            out.append(
                (
                    "method.objective",
                    "dpo trains on preference pairs: use data.format preference (or auto) with no task preset",
                )
            )
        if task.head:
            out.append(("method.objective", "dpo and task.head do not mix; drop one"))
        if "dpo" in METHODS[method.name].limits:
            out.append(("method.objective", METHODS[method.name].limits["dpo"]))
    if task.head and "head" in METHODS[method.name].limits:
        out.append(("task.head", METHODS[method.name].limits["head"]))
    return out
