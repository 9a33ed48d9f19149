"""A conversation as the model's prompt, and the tokens that end its reply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phitune.data.chat import turn_closers

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def end_of_turn_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos plus the chat template's end-of-turn token(s), so generation stops after one reply."""
    return stop_token_ids(tokenizer, getattr(model, "generation_config", None))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> list[int]:
    """end_of_turn_ids from a generation config (or none) rather than a loaded model."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    out.add(tokenizer.eos_token_id)
    out.update(tokenizer.convert_tokens_to_ids(tok) for tok in turn_closers(tokenizer))
    return sorted(i for i in out if i is not None)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> list[int]:
    """A conversation through the chat template, ready for the assistant's turn; or raw text
    (`data.chat_template: false`, templates), tokenized as training tokenized its prompts."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
