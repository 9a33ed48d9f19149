"""Multiple choice by log-likelihood: no generation, each choice scored as the model's answer.

Rows are `{"question", "choices": [...], "answer": index or choice text}` (any question set of
your own), or TruthfulQA's multiple-choice form `{"question", "mc1_targets": {"choices",
"labels"}, "mc2_targets": {...}}`, where MC1 has one true choice and MC2 several. A choice's
score is the summed log-probability of its tokens after the question (through the chat template
when the tokenizer has one), as lm-evaluation-harness computes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

import phitune.tasks.metrics as metrics
from phitune.data.chat import IGNORE_INDEX, Example
from phitune.data.readers import read_rows
from phitune.errors import PhituneError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

EXPECTED = (
    '{"question": "...", "choices": ["...", "..."], "answer": 0} '
    'or TruthfulQA\'s {"question", "mc1_targets", "mc2_targets"}'
)


def _targets(value, where: str, key: str) -> tuple[list[str], set[int]] | str:
    if not (
        isinstance(value, dict) and isinstance(value.get("choices"), list) and isinstance(value.get("labels"), list)
    ):
        return f'{where}: \'{key}\' must be {{"choices": [...], "labels": [1, 0, ...]}}'
    choices, labels = value["choices"], value["labels"]
    if len(choices) != len(labels) or not choices or not all(isinstance(c, str) and c.strip() for c in choices):
        return f"{where}: '{key}' needs as many labels as choices, and non-empty choices"
    correct = {i for i, v in enumerate(labels) if v in (1, True)}
    if not correct:
        return f"{where}: '{key}' has no correct choice (no label 1)"
    return choices, correct


def parse_row(row: dict, where: str) -> tuple[dict, list[str]]:
    """{question, sets: {name: (choices, correct)}} or problems."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
        return {}, [f"{where}: expected {EXPECTED}; 'question' must be a non-empty string"]
    sets, problems = {}, []
    if "choices" in row:
        choices, answer = row["choices"], row.get("answer")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            problems.append(f"{where}: 'choices' must be a list of at least two non-empty strings")
        elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            sets["accuracy"] = (choices, {answer})
        elif isinstance(answer, str) and answer in choices:
            sets["accuracy"] = (choices, {choices.index(answer)})
        else:
            problems.append(
                f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1}) or its text, got "
                f"{answer!r}"
            )
    for key in ("mc1_targets", "mc2_targets"):
        if key in row:
            got = _targets(row[key], where, key)
            if isinstance(got, str):
                problems.append(got)
            else:
                sets[key[:3]] = got
    if not sets and not problems:
        problems.append(f"{where}: expected {EXPECTED}")
    return {"question": row["question"], "sets": sets}, problems


def choice_examples(tokenizer: PreTrainedTokenizerBase, question: str, choices: list[str]) -> list[Example]:
    from phitune.generate import prompt_ids

    if tokenizer.chat_template:
        prompt = prompt_ids(tokenizer, [{"role": "user", "content": question}])
        conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    else:
        prompt = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]
        conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    return [Example(prompt + c, [IGNORE_INDEX] * len(prompt) + c, "") for c in conts]


@torch.no_grad()
def loglikelihoods(
    model: Any, tokenizer: PreTrainedTokenizerBase, examples: list[Example], batch_size: int
) -> list[float]:
    from phitune.data.batching import collate
    from phitune.training.loss import sequence_logps

    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        batch = {
            k: v.to(model.device) for k, v in collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()
        }
        out += sequence_logps(model, batch).float().tolist()
    return out


def evaluate_choices(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    data_file: str,
    *,
    batch_size: int = 16,
    limit: int | None = None,
) -> tuple[dict, int]:
    rows, errors = read_rows(data_file)
    parsed, problems = [], list(errors)
    for row in rows:
        item, bad = parse_row(row.value, row.where)
        problems += bad
        if not bad:
            parsed.append(item)
    if problems:
        raise PhituneError(
            f"{data_file}: {len(problems)} problem(s) in the multiple-choice file", problems=problems[:20]
        )
    if not parsed:
        raise PhituneError(f"{data_file}: no questions; expected rows like {EXPECTED}")
    parsed = parsed[:limit] if limit else parsed
    values: dict = {}
    for name in ("accuracy", "mc1", "mc2"):
        items = [p for p in parsed if name in p["sets"]]
        if not items:
            continue
        examples: list = []
        spans: list = []
        correct: list = []
        lengths: list = []
        for item in items:
            choices, good = item["sets"][name]
            spans.append((len(examples), len(examples) + len(choices)))
            examples += choice_examples(tokenizer, item["question"], choices)
            correct.append(good)
            lengths.append([len(c) for c in choices])
        ll = loglikelihoods(model, tokenizer, examples, batch_size)
        scored = metrics.multiple_choice([ll[a:b] for a, b in spans], correct, lengths)
        if name == "accuracy":
            values |= {"accuracy": scored["accuracy"], "accuracy_norm": scored["accuracy_norm"]}
        else:
            values[name] = scored["accuracy"] if name == "mc1" else scored["mc2"]
    return values, len(parsed)
