"""The samples rows become, and the small checks every format and task preset shares.

Samples are what tokenization understands:
- `Chat`: OpenAI-style messages, rendered with the model's chat template, assistant turns trained.
- `Plain`: prompt + completion as raw text (no template), completion and eos trained; `prompt`
  empty and `pack` set for domain text (continued pretraining).
- `Preference`: a prompt conversation with a preferred and a non-preferred assistant reply (DPO).
- `Labelled` / `Tagged`: text with a class label, words with BIO tags (classification heads).

This module imports nothing of phitune's: the data formats (`data/`) and the task presets
(`tasks/`) both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chat:
    messages: list[dict]


@dataclass
class Plain:
    prompt: str
    completion: str
    pack: bool = False


@dataclass
class Preference:
    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass
class Labelled:
    text: str
    label: str


@dataclass
class Tagged:
    tokens: list[str]
    tags: list[str]


@dataclass
class FormatOptions:
    template: str | None = None  # the `template` format's pattern
    completion_field: str | None = None  # where in `template` the completion starts
    chat_template: bool = True  # prompt/completion, alpaca: through the chat template, or raw text
    system: str | None = None  # a system message for formats that have none
    extra: dict[str, Any] = field(default_factory=dict)


Result = tuple[Any, list[str]]


def need(row: dict, where: str, key: str, kinds=(str,), what="a string") -> list[str]:
    if key not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        return [f"{where}: missing key '{key}' (keys present: {present})"]
    value = row[key]
    if not isinstance(value, kinds):
        return [f"{where}: '{key}' must be {what}, got {type(value).__name__}"]
    if isinstance(value, str) and not value.strip():
        return [f"{where}: '{key}' is empty; fill it in or remove the example"]
    return []


def not_object(row, where: str, example: str) -> list[str]:
    return (
        [] if isinstance(row, dict) else [f"{where}: expected a JSON object like {example}, got {type(row).__name__}"]
    )


def prompt_reply(prompt: str, reply: str, opts: FormatOptions, system: str | None = None):
    if not opts.chat_template:
        return Plain(prompt, reply)
    sys_msg = system or opts.system
    return Chat(
        ([{"role": "system", "content": sys_msg}] if sys_msg else [])
        + [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    )
