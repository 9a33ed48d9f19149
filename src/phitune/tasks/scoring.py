"""What every generative task shares when its answers are scored: what the model is asked, the
reply it was trained to give, how many tokens it may answer with, which way a metric is better."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phitune.samples import Chat, Plain

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Metrics where lower is better; every other metric is a score (higher is better).
LOWER_IS_BETTER = {"loss", "perplexity"}


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


def answer_budget(tokenizer: PreTrainedTokenizerBase, references: list[str]) -> int:
    """New tokens for an answer: the longest reference and some room, at most 512."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(512, longest + max(8, longest // 2))


def headline(values: dict) -> dict[str, float]:
    """The plain numbers of a metrics dict (nested tables such as the confusion matrix left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
