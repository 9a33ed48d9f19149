"""Generated answers -> a task's metrics. `phitune eval`, `phitune compare` and the evaluation
during training all score through `score`, so the numbers agree wherever they are shown."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from phitune.data.formats import Chat, Plain
from phitune.data.tasks import TaskSpec
from phitune.evaluate import metrics
from phitune.registry import TASKS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Metrics where lower is better; every other metric is a score (higher is better).
LOWER_IS_BETTER = {"loss", "perplexity"}


def primary_metric(spec: TaskSpec) -> str:
    """The metric a task is judged by (best checkpoint, the headline of a report)."""
    return TASKS[spec.name].primary


def prompt_and_reference(sample: object) -> tuple[str | list[dict], str]:
    """What the model is asked (the conversation up to the last assistant turn, or the raw
    prompt) and the reply it was trained to give."""
    if isinstance(sample, Plain):
        return sample.prompt, sample.completion
    if isinstance(sample, Chat):
        last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
        return sample.messages[:last], sample.messages[last]["content"]
    raise TypeError(f"no generative reference for {type(sample).__name__}")


def generative(sample: object) -> bool:
    """A sample the model can be asked to complete (not raw text to continue, not a head's)."""
    return (isinstance(sample, Chat) and any(m["role"] == "assistant" for m in sample.messages)) or (
        isinstance(sample, Plain) and not sample.pack and bool(sample.prompt)
    )


def canonical_label(answer: str, labels: list[str]) -> str:
    """The label an answer names, ignoring case, surrounding space and final punctuation (the
    answer "Positive." is the label "positive"); any other answer stays itself and is wrong."""
    clean = answer.strip().strip(string.punctuation + " ").casefold()
    for label in labels:
        if clean == label.casefold():
            return label
    return answer.strip()


def score(spec: TaskSpec, predictions: list[str], references: list[str]) -> dict:
    """The task's metrics (a flat dict of numbers, plus per-class details for classification):
    the generative task's `registry.TASKS[name].metrics`, in that order."""
    name = spec.name
    if name == "classification":
        out = metrics.classification([canonical_label(p, spec.labels) for p in predictions], references, spec.labels)
        out["valid_label"] = sum(canonical_label(p, spec.labels) in spec.labels for p in predictions) / max(
            len(predictions), 1
        )
        return out
    if name == "ner":
        parsed = [metrics.parse_entities(p) for p in predictions]
        refs = [metrics.parse_entities(r) or [] for r in references]
        ents = metrics.entities([p or [] for p in parsed], refs)
        return {
            "entity_f1": ents["f1"],
            "entity_precision": ents["precision"],
            "entity_recall": ents["recall"],
            "valid_json": sum(p is not None for p in parsed) / max(len(parsed), 1),
        }
    if name == "translation":
        return metrics.translation(predictions, references)
    if name == "qa":
        return metrics.qa(predictions, references)
    if name == "creative":
        return metrics.rouge_l(predictions, references) | metrics.distinct_n(predictions, 2)
    # chat and anything else with replies: overlap with the reference reply.
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)
    return metrics.rouge_l(predictions, references) | {"exact_match": exact}


def answer_budget(tokenizer: PreTrainedTokenizerBase, references: list[str]) -> int:
    """New tokens for an answer: the longest reference and some room, at most 512."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(512, longest + max(8, longest // 2))


def headline(values: dict) -> dict[str, float]:
    """The plain numbers of a metrics dict (nested tables such as the confusion matrix left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
