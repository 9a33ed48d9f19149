"""`phitune eval`: one model on one held-out file, scored the way its task is scored.

A model is a base (hub id or path), an adapter dir, a merged / full model dir, or a training
output dir; for the last three phitune finds how it was trained (OUT/task.json: task, labels,
prompt wording; OUT/config.yaml: the data options), so its eval prompts are its training prompts.
A base model is evaluated with the spec of the run it is compared with (`compare`) or `--task`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from phitune.data.leakage import Leakage, find_leakage
from phitune.data.tokenize import PairExample
from phitune.errors import PhituneError
from phitune.registry import EVAL_TASKS
from phitune.tasks import GENERATIVE_TASKS, TASKS, TaskSpec, model_head, score, scoring

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from phitune.data.dataset import Split

log = logging.getLogger("phitune")

DATA_OPTIONS = ("format", "template", "completion_field", "chat_template", "system", "max_length")


@dataclass
class Subject:
    """A model to evaluate and what is known about how it was trained."""

    path: str
    base: str
    adapter: str | None
    spec: TaskSpec | None = None  # OUT/task.json of the run that made it
    data_options: dict = field(default_factory=dict)  # that run's data.format, template, chat_template, ...
    train_file: str | None = None
    validation_file: str | None = None


def locate(path: str, base: str | None = None) -> Subject:
    from phitune.models import resolve_trained

    model_path, adapter = resolve_trained(path)
    if base and adapter:
        model_path = base
    subject = Subject(path, model_path, adapter)
    here = Path(adapter or model_path)
    for folder in (here, here.parent, Path(path)):
        if subject.spec is None and (folder / "task.json").is_file():
            subject.spec = TaskSpec.from_json((folder / "task.json").read_text())
        config = folder / "config.yaml"
        if not subject.data_options and config.is_file():
            import yaml

            data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
            subject.data_options = {k: data[k] for k in DATA_OPTIONS if k in data}
            subject.train_file, subject.validation_file = data.get("train"), data.get("validation")
    return subject


@dataclass
class Evaluated:
    name: str
    path: str
    task: str
    examples: int
    metrics: dict  # the task's metrics (+ loss/perplexity where there is a reference text)
    predictions: list[dict] = field(default_factory=list)  # where, prompt, reference, prediction
    leakage: Leakage | None = None

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "model": self.path,
            "task": self.task,
            "examples": self.examples,
            "metrics": self.metrics,
            "leakage": self.leakage.as_dict() if self.leakage else None,
        }


def resolve_spec(subject: Subject, data_file: str, task: str | None, spec: TaskSpec | None = None) -> TaskSpec:
    """The task spec to score with: given (compare shares one), the model's own, or `--task`."""
    from phitune.config import TaskConfig
    from phitune.data.readers import read_rows

    if spec is not None:
        return spec
    if task is not None and TASKS[task].own_evaluator:
        return TASKS[task].spec(None, [])
    if task is None and subject.spec is not None:
        return subject.spec
    if task is None:
        raise PhituneError(
            f"{subject.path}: no task.json (not a phitune training output); say what to score with "
            f"--task {' | '.join(EVAL_TASKS)}"
        )
    if subject.spec is not None and subject.spec.name == task:
        return subject.spec
    rows, _ = read_rows(data_file)
    return TASKS[task].spec(TaskConfig(name=task), rows)


def _data_config(data_file: str, options: dict):
    from phitune.config import DataConfig

    return DataConfig(train=str(data_file), **options)


def read_eval_split(
    data_file: str, spec: TaskSpec, options: dict, tokenizer: PreTrainedTokenizerBase | None = None
) -> Split:
    """The file's samples under the task spec (errors raised), tokenized when a tokenizer is given."""
    from phitune.config import TaskConfig
    from phitune.data.dataset import raise_on_errors, read_split, tokenize_split

    data_cfg = _data_config(data_file, options)
    split, _ = read_split(data_file, data_cfg, TaskConfig(name=spec.name, head=spec.head), spec)
    raise_on_errors(split)
    if tokenizer is not None:
        tokenize_split(split, tokenizer, data_cfg.max_length, spec)
    return split


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def evaluate_model(
    subject: Subject,
    data_file: str,
    *,
    name: str | None = None,
    task: str | None = None,
    spec: TaskSpec | None = None,
    data_options: dict | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    train_file: str | None = None,
) -> Evaluated:
    from phitune.models import load_for_inference

    name = name or Path(subject.path).name
    spec = resolve_spec(subject, data_file, task, spec)
    if TASKS[spec.name].own_evaluator:
        from phitune.evaluate.choice import evaluate_choices

        model, tokenizer = load_for_inference(subject.base, subject.adapter, dtype=_dtype(), device=_device())
        values, n = evaluate_choices(model, tokenizer, data_file, batch_size=batch_size, limit=limit)
        return Evaluated(name, subject.path, spec.name, n, values)
    options = data_options if data_options is not None else subject.data_options
    head, labels = model_head(spec)
    model, tokenizer = load_for_inference(
        subject.base, subject.adapter, dtype=_dtype(), device=_device(), head=head, labels=labels
    )
    split = read_eval_split(data_file, spec, options, tokenizer)
    kept = split.kept[:limit] if limit else split.kept
    examples = split.examples[: len(kept)]
    if not examples:
        raise PhituneError(f"{data_file}: no example to evaluate")
    leakage = None
    train_file = train_file or subject.train_file
    if train_file and Path(train_file).exists() and Path(train_file).resolve() != Path(data_file).resolve():
        train_split = read_eval_split(train_file, spec, options)
        leakage = find_leakage(kept, train_split.samples)
        if warning := leakage.warning(train_file):
            log.warning("%s", warning)
    if spec.head:
        values, predictions = score_head(model, tokenizer, spec, examples, kept, batch_size)
    elif isinstance(examples[0], PairExample):
        values, predictions = score_preferences(model, tokenizer, examples, batch_size), []
    else:
        values, predictions = score_generative(
            model, tokenizer, spec, examples, kept, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
    return Evaluated(name, subject.path, spec.name, len(kept), values, predictions, leakage)


def score_head(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    examples: list,
    kept: list,
    batch_size: int,
) -> tuple[dict, list[dict]]:
    from phitune.training.objectives import build_objective, evaluate

    device = model.device
    # The head's objective (sequence or token classification), which also predicts.
    objective: Any = build_objective(spec, tokenizer.pad_token_id)
    with torch.no_grad():
        guessed = [
            p
            for i in range(0, len(examples), batch_size)
            for p in objective.predict(model, examples[i : i + batch_size], device)
        ]
    loss = evaluate(objective, model, examples, batch_size=batch_size, device=device)["loss"]
    values, shown = TASKS[spec.name].score_head(spec, [sample for _, sample in kept], guessed)
    predictions = [
        {"where": w, "prompt": text, "reference": ref, "prediction": pred}
        for (w, _), (text, ref, pred) in zip(kept, shown)
    ]
    return values | {"loss": loss}, predictions


@torch.no_grad()
def score_preferences(model: Any, tokenizer: PreTrainedTokenizerBase, examples: list, batch_size: int) -> dict:
    """Preference pairs, without a reference model (so a base and its fine-tune compare): how
    often the preferred reply is the more likely one, and by how much (summed log-probabilities)."""
    from phitune.data.batching import collate
    from phitune.training.loss import sequence_logps

    margins: list[float] = []
    for i in range(0, len(examples), batch_size):
        part = examples[i : i + batch_size]
        batch = {
            k: v.to(model.device)
            for k, v in collate([e.chosen for e in part] + [e.rejected for e in part], tokenizer.pad_token_id).items()
        }
        logps = sequence_logps(model, batch).float()
        margins += (logps[: len(part)] - logps[len(part) :]).tolist()
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
        "logp_margin": sum(margins) / len(margins),
    }


def score_generative(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    examples: list,
    kept: list,
    *,
    batch_size: int,
    max_new_tokens: int | None,
) -> tuple[dict, list[dict]]:
    """Loss and perplexity on the references (teacher forcing), then the task metric on greedy
    answers when the task has one."""
    from phitune.evaluate.lm import lm_metrics
    from phitune.generate import complete_batch
    from phitune.models import num_virtual_tokens

    values = lm_metrics(
        model,
        examples,
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        device=model.device,
        virtual_tokens=num_virtual_tokens(model),
    )
    asked = [(w, s) for w, s in kept if scoring.generative(s)]
    if spec.name not in GENERATIVE_TASKS or not asked:
        return values, []
    prompts, references = zip(*(scoring.prompt_and_reference(s) for _, s in asked))
    if max_new_tokens is None:
        max_new_tokens = scoring.answer_budget(tokenizer, references)
    answers = complete_batch(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
    values = values | score(spec, answers, list(references))
    predictions = [
        {"where": w, "prompt": p if isinstance(p, str) else p[-1]["content"], "reference": r, "prediction": a}
        for (w, _), p, r, a in zip(asked, prompts, references, answers)
    ]
    return values, predictions


def write_outputs(result: Evaluated, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(result.as_json(), indent=2, ensure_ascii=False) + "\n")
    with (output / "predictions.jsonl").open("w") as f:
        for p in result.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")


def table(results: list[Evaluated]) -> list[str]:
    """Plain-text table: one row per metric, one column per model."""
    keys = metric_keys(results)
    names = [r.name for r in results]
    width = max([len(k) for k in keys] + [6])
    cols = [max(len(n), 9) for n in names]
    lines = ["  ".join([f"{'metric':<{width}}"] + [f"{n:>{c}}" for n, c in zip(names, cols)])]
    for k in keys:
        cells = [f"{_fmt(r.metrics.get(k)):>{c}}" for r, c in zip(results, cols)]
        lines.append("  ".join([f"{k:<{width}}"] + cells))
    return lines


def metric_keys(results: list[Evaluated]) -> list[str]:
    """Every plain metric of the results, in first-seen order (the rows of a table)."""
    return list(dict.fromkeys(k for r in results for k in scoring.headline(r.metrics)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
