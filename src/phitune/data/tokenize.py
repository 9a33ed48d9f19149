"""Samples -> token ids with labels, one function per sample kind.

Each returns the example (truncated to `max_length`) and the untruncated length, which the
validator reports ("412 tokens, 156 over data.max_length").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from phitune.data.chat import IGNORE_INDEX, Example, tokenize_conversation
from phitune.errors import PhituneError
from phitune.samples import Chat, Labelled, Plain, Preference, Tagged

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class ClassExample:
    """Text for a sequence-classification head: the head reads the last token."""

    input_ids: list[int]
    label: int
    source: str

    @property
    def num_trained(self) -> int:
        return 1


@dataclass
class PairExample:
    """A preferred and a non-preferred reply to the same prompt (DPO)."""

    chosen: Example
    rejected: Example
    source: str

    @property
    def input_ids(self) -> list[int]:  # for length grouping: the longer of the two
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)

    @property
    def num_trained(self) -> int:
        return 1

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def tokenize_plain(
    tokenizer: PreTrainedTokenizerBase, sample: Plain, max_length: int, where: str
) -> tuple[Example, int]:
    """Raw prompt (untrained) + completion + eos (trained). Prompt and completion are tokenized
    apart, so the boundary never merges a prompt character into a trained token."""
    prompt = _ids(tokenizer, sample.prompt, special=True)
    completion = _ids(tokenizer, sample.completion, special=not prompt) + [tokenizer.eos_token_id]
    ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion
    return Example(ids[:max_length], labels[:max_length], where), len(ids)


def tokenize_labelled(
    tokenizer: PreTrainedTokenizerBase, sample: Labelled, label_ids: dict[str, int], max_length: int, where: str
) -> tuple[ClassExample, int]:
    ids = _ids(tokenizer, sample.text, special=True) + [tokenizer.eos_token_id]
    # Keep the end (with eos): a sequence-classification head reads the last token.
    return ClassExample(ids[-max_length:], label_ids[sample.label], where), len(ids)


def tokenize_tagged(
    tokenizer: PreTrainedTokenizerBase, sample: Tagged, tag_ids: dict[str, int], max_length: int, where: str
) -> tuple[Example, int]:
    """Words joined by spaces; each word's first token carries its tag, the rest are ignored."""
    text, starts = "", []
    for i, word in enumerate(sample.tokens):
        if i:
            text += " "
        starts.append((len(text), len(text) + len(word)))
        text += word
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    w = 0
    for j, (a, b) in enumerate(offsets):
        while w < len(starts) and a >= starts[w][1]:
            w += 1
        if w < len(starts) and b > starts[w][0] and b > a:
            labels[j] = tag_ids[sample.tags[w]]
            w += 1  # later tokens of this word stay ignored
    return Example(ids[:max_length], labels[:max_length], where), len(ids)


def tokenize_sample(
    tokenizer: PreTrainedTokenizerBase,
    sample: object,
    max_length: int,
    where: str,
    label_ids: dict[str, int] | None = None,
) -> tuple[Example | PairExample | ClassExample, int]:
    """(example, untruncated length)."""
    if isinstance(sample, Chat):
        _require_template(tokenizer, where)
        ex, _ = tokenize_conversation(tokenizer, sample.messages, 10**9, where)
        n = len(ex.input_ids)
        return Example(ex.input_ids[:max_length], ex.labels[:max_length], where), n
    if isinstance(sample, Plain):
        return tokenize_plain(tokenizer, sample, max_length, where)
    if isinstance(sample, Preference):
        _require_template(tokenizer, where)
        chosen, _ = tokenize_conversation(
            tokenizer, sample.prompt + [{"role": "assistant", "content": sample.chosen}], 10**9, where
        )
        rejected, _ = tokenize_conversation(
            tokenizer, sample.prompt + [{"role": "assistant", "content": sample.rejected}], 10**9, where
        )
        n = max(len(chosen.input_ids), len(rejected.input_ids))
        cut = [Example(e.input_ids[:max_length], e.labels[:max_length], where) for e in (chosen, rejected)]
        return PairExample(cut[0], cut[1], where), n
    if isinstance(sample, (Labelled, Tagged)):
        if label_ids is None:
            raise TypeError(f"{where}: a head's sample needs the head's label ids")
        if isinstance(sample, Labelled):
            return tokenize_labelled(tokenizer, sample, label_ids, max_length, where)
        return tokenize_tagged(tokenizer, sample, label_ids, max_length, where)
    raise TypeError(f"unknown sample type {type(sample).__name__}")


def _require_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise PhituneError(
            f"{where}: this example needs a chat template but the tokenizer has none; set data.chat_template: false "
            "(prompt/completion, Alpaca, tasks) or use an instruct/chat model"
        )
