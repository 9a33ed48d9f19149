"""OpenAI chat JSONL -> token ids with a loss mask, using the model's own chat template.

The mask is derived from the rendered text, not from `{% generation %}` markers (most templates
have none): an assistant turn spans from the end of the prompt rendered with
`add_generation_prompt=True` to where the conversation rendered up to and including that turn
stops agreeing with the full conversation. That span holds the reply *and* the end-of-turn
token(s), so the model learns to stop. Tokens are labelled when they lie wholly inside a trained
span; `weight: 0` turns are rendered but not trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from phitune.errors import PhituneError

ROLES = ("system", "user", "assistant", "tool", "developer")
IGNORE_INDEX = -100
MAX_SHOWN = 20


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str  # file:line, for error messages and reports

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class TokenizedSet:
    examples: list[Example]
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # sources dropped: nothing left to train after truncation

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def _problems_for(row, where: str) -> list[str]:
    if not isinstance(row, dict):
        return [f"{where}: expected a JSON object with a 'messages' list, got {type(row).__name__}"]
    if "messages" not in row:
        keys = ", ".join(sorted(row)) or "none"
        return [f"{where}: missing key 'messages' (keys present: {keys}); each line must be {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}"]
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return [f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"]
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            out.append(f"{at}: expected an object with 'role' and 'content'")
            continue
        role = m.get("role")
        if role not in ROLES:
            out.append(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            out.append(f"{at}: 'content' must be a string, got {type(content).__name__}")
        elif not content.strip():
            out.append(f"{at}: empty content; remove the message or fill it in")
        if "weight" in m:
            if role != "assistant":
                out.append(f"{at}: 'weight' is only allowed on assistant messages")
            elif m["weight"] not in (0, 1):
                out.append(f"{at}: 'weight' must be 0 or 1, got {m['weight']!r}")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        out.append(f"{where}: no assistant message; nothing to train on")
    elif not any(isinstance(m, dict) and m.get("role") == "assistant" and m.get("weight", 1) == 1 for m in messages):
        out.append(f"{where}: every assistant message has weight 0; nothing to train on")
    return out


def read_chat_jsonl(path: str | Path) -> list[tuple[str, list[dict]]]:
    """Read and check every line; raise one PhituneError listing every problem with file:line."""
    path = Path(path)
    if not path.is_file():
        raise PhituneError(f"{path}: data file not found; check data.train / data.validation")
    rows: list[tuple[str, list[dict]]] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object")
                continue
            found = _problems_for(row, where)
            if found:
                problems += found
            else:
                rows.append((where, row["messages"]))
    if problems:
        shown = problems[:MAX_SHOWN]
        if len(problems) > MAX_SHOWN:
            shown.append(f"... and {len(problems) - MAX_SHOWN} more")
        raise PhituneError(f"{path}: {len(problems)} problem(s) in the data file", problems=shown)
    if not rows:
        raise PhituneError(f"{path}: no examples; the file is empty")
    return rows


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def trained_spans(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
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
        spans.append((len(prompt), end))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, where: str = "") -> tuple[Example, bool]:
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


def tokenize_file(tokenizer, path: str | Path, max_length: int) -> TokenizedSet:
    rows = read_chat_jsonl(path)
    out = TokenizedSet([])
    for where, messages in rows:
        ex, truncated = tokenize_conversation(tokenizer, messages, max_length, where)
        out.truncated += truncated
        if ex.num_trained == 0:
            out.dropped.append(where)
        else:
            out.examples.append(ex)
    if not out.examples:
        raise PhituneError(
            f"{path}: no example has assistant tokens left within data.max_length={max_length}; raise data.max_length"
        )
    return out
