"""Chat messages -> token ids with a loss mask, using the model's own chat template.

The mask is derived from the rendered text, not from `{% generation %}` markers (most templates
have none): an assistant turn spans from the end of the prompt rendered with
`add_generation_prompt=True` to where the conversation rendered up to and including that turn
stops agreeing with the full conversation. That span holds the reply *and* the end-of-turn
token(s), so the model learns to stop. Tokens are labelled when they lie wholly inside a trained
span; `weight: 0` turns are rendered but not trained.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str  # file:line, for error messages and reports

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def trained_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str = ""
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to train on."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not full.startswith(prompt):
            raise PhituneError(
                f"{where}: the model's chat template renders the conversation before assistant turn {i} differently "
                "from the full conversation, so its reply cannot be located; use a template whose prefixes agree"
            )
        end = _common_prefix(_render(tokenizer, messages[: i + 1], add_generation_prompt=False), full)
        if end <= len(prompt):
            raise PhituneError(f"{where}: assistant turn {i} renders to nothing with this chat template")
        spans.append((len(prompt), _turn_end(tokenizer, full, len(prompt), end, m["content"])))
    return full, spans


# Tokens that close an assistant turn in the common chat templates (besides eos).
END_OF_TURN = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")
_CLOSERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def turn_closers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The END_OF_TURN tokens and eos that are single tokens of this tokenizer. Cached per
    tokenizer: `get_vocab()` builds a fresh dict of the whole vocabulary (tens of ms at 49k
    entries), which per turn was most of the time spent tokenizing a data file."""
    if tokenizer not in _CLOSERS:
        vocab = tokenizer.get_vocab()
        _CLOSERS[tokenizer] = tuple(dict.fromkeys(t for t in (*END_OF_TURN, tokenizer.eos_token) if t and t in vocab))
    return _CLOSERS[tokenizer]


def _turn_end(tokenizer, full: str, start: int, end: int, content: str) -> int:
    """The turn is trained up to and including its end-of-turn token: what the template adds
    after it (a newline, the final eos) is never generated, since generation stops at that token.
    Trained, it would teach a small model to end a reply right where a reply should begin."""
    after = full.find(content.strip(), start, end)
    after = after + len(content.strip()) if after >= 0 else start
    found = [(full.find(tok, after, end), tok) for tok in turn_closers(tokenizer)]
    found = [(pos, tok) for pos, tok in found if pos >= 0]
    if not found:
        return end
    pos, tok = min(found)
    return pos + len(tok)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int, where: str = ""
) -> tuple[Example, bool]:
    text, spans = trained_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    si = 0
    for j, (start, end) in enumerate(offsets):
        while si < len(spans) and start >= spans[si][1]:
            si += 1
        # Whole tokens only: where the next turn starts with the same characters as the text
        # after this one (`<|user|>` vs `<|endoftext|>`), the span ends inside a token.
        if si < len(spans) and spans[si][0] <= start and end <= spans[si][1]:
            labels[j] = ids[j]
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], where), truncated
