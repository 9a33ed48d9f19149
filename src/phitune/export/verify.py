"""What an export is checked on: the run's held-out prompts and text, and how close another
runtime's greedy reply comes to PyTorch's (shared by the ONNX and GGUF checks)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PROMPTS = [
    "Hello! Who are you?",
    "What is the capital of France?",
    "Write one sentence about coffee.",
    "Translate to French: the cup is hot.",
    "List three colours.",
]


def held_out(source: Path, data: str | None, tokenizer):
    """The run's validation file (or `data`), read and tokenized as the run was trained; None
    when there is neither."""
    from phitune.evaluate.runner import locate, read_eval_split, resolve_spec

    subject = locate(str(source))
    data = data or subject.validation_file
    if not data:
        return None
    spec = resolve_spec(subject, data, None if subject.spec else "chat")
    return read_eval_split(data, spec, subject.data_options, tokenizer)


def held_out_prompts(split, count: int) -> list[tuple]:
    """Up to `count` held-out (prompt, reference answer) pairs, the prompt a conversation or text;
    else a few general prompts without references."""
    from phitune.tasks import scoring

    kept = split.kept if split else []
    asked: list[tuple] = [scoring.prompt_and_reference(s) for _, s in kept if scoring.generative(s)][:count]
    return asked or [([{"role": "user", "content": p}], None) for p in DEFAULT_PROMPTS]


def token_agreement(got: list[int], reference: list[int]) -> float:
    """The share of the longer reply that both replies have in common before they first differ."""
    longest = max(len(got), len(reference), 1)
    same = next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), min(len(got), len(reference)))
    return same / longest


def runtime_perplexity(examples: list, logits_of) -> float:
    """exp(mean cross-entropy) over the examples' trained tokens, `logits_of(example)` giving
    another runtime's next-token logits for every position of the example."""
    import math

    total, count = 0.0, 0
    for e in examples:
        loss, tokens = answer_cross_entropy(logits_of(e), e.labels)
        total, count = total + loss, count + tokens
    return math.exp(total / max(count, 1))


def answer_cross_entropy(logits, labels) -> tuple[float, int]:
    """(summed cross-entropy, count) of the trained tokens (labels != -100) under next-token
    `logits` ([positions, vocab], numpy) from another runtime."""
    import math

    import numpy as np

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    total, count = 0.0, 0
    for pos in np.nonzero(labels[1:] != -100)[0]:
        row = logits[pos]
        top = row.max()
        total += top + math.log(np.exp(row - top).sum()) - row[labels[pos + 1]]
        count += 1
    return total, count
