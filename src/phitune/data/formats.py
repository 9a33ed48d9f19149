"""Row formats -> samples (`phitune.samples`). Each converter checks one row and returns
(sample or None, problems).

Every format that has a chat equivalent converts to `Chat`, so it yields exactly the token ids
and labels of that chat form.
"""

from __future__ import annotations

from typing import Any, Callable

from phitune.config import template_fields
from phitune.samples import (
    Chat,
    FormatOptions,
    Plain,
    Preference,
    Result,
    need,
    not_object,
    prompt_reply,
)

ROLES = ("system", "user", "assistant", "tool", "developer")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
}


def check_messages(messages: object, where: str, key: str = "messages", need_assistant: bool = True) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{where}: '{key}' must be a non-empty list of {{role, content}} objects"]
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict):
            out.append(f"{at}: expected an object with 'role' and 'content', got {type(m).__name__}")
            continue
        role = m.get("role")
        if role not in ROLES:
            out.append(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            out.append(f"{at}: 'content' must be a string, got {type(content).__name__}")
        elif not content.strip():
            out.append(f"{at}: empty content; remove the message or fill it in")
        # Parquet and datasets fill a key missing from some rows with None: None means absent.
        if m.get("weight") is not None:
            if role != "assistant":
                out.append(f"{at}: 'weight' is only allowed on assistant messages")
            elif m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                out.append(f"{at}: 'weight' must be 0 or 1, got {m['weight']!r}")
    if need_assistant:
        assistants = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if not assistants:
            out.append(f"{where}: no assistant message; nothing to train on")
        elif all(m.get("weight") == 0 for m in assistants):
            out.append(f"{where}: every assistant message has weight 0; nothing to train on")
    return out


def _clean(messages: list[dict]) -> list[dict]:
    return [
        {"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if m.get("weight") is not None else {})}
        for m in messages
    ]


def _with_system(messages: list[dict], opts: FormatOptions) -> list[dict]:
    if opts.system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": opts.system}] + messages
    return messages


# --- the formats ----------------------------------------------------------------------------


def chat(row: dict, where: str, opts: FormatOptions) -> Result:
    problems = not_object(row, where, '{"messages": [{"role": ..., "content": ...}]}')
    if problems:
        return None, problems
    if "messages" not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        return None, [
            f"{where}: missing key 'messages' (keys present: {keys}); each line must be "
            f'{{"messages": [{{"role": ..., "content": ...}}]}}'
        ]
    problems = check_messages(row["messages"], where)
    return (None if problems else Chat(_with_system(_clean(row["messages"]), opts))), problems


def prompt_completion(row: dict, where: str, opts: FormatOptions) -> Result:
    """TRL's prompt/completion: strings, or conversational (message lists)."""
    problems = not_object(row, where, '{"prompt": "...", "completion": "..."}')
    if problems:
        return None, problems
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        problems = check_messages(row.get("prompt"), where, "prompt", need_assistant=False)
        problems += check_messages(row.get("completion"), where, "completion")
        if problems:
            return None, problems
        prompt = [dict(m, weight=0) if m["role"] == "assistant" else m for m in _clean(row["prompt"])]
        return Chat(_with_system(prompt + _clean(row["completion"]), opts)), []
    problems = need(row, where, "prompt") + need(row, where, "completion")
    return (None if problems else prompt_reply(row["prompt"], row["completion"], opts)), problems


def alpaca(row: dict, where: str, opts: FormatOptions) -> Result:
    """instruction + optional input -> output; the input follows the instruction after a blank line."""
    problems = not_object(row, where, '{"instruction": "...", "input": "...", "output": "..."}')
    if problems:
        return None, problems
    problems = need(row, where, "instruction") + need(row, where, "output")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        problems.append(f"{where}: 'input' must be a string, got {type(extra).__name__}")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        problems.append(f"{where}: 'system' must be a string, got {type(system).__name__}")
    if problems:
        return None, problems
    prompt = row["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
    return prompt_reply(prompt, row["output"], opts, system=system or None), []


def sharegpt(row: dict, where: str, opts: FormatOptions) -> Result:
    problems = not_object(row, where, '{"conversations": [{"from": "human", "value": "..."}]}')
    if problems:
        return None, problems
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        if "conversations" not in row:
            return None, [
                f"{where}: missing key 'conversations' (keys present: {', '.join(sorted(map(str, row))) or 'none'})"
            ]
        return None, [f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects"]
    messages = []
    for i, t in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(t, dict):
            problems.append(f"{at}: expected an object with 'from' and 'value', got {type(t).__name__}")
            continue
        role = SHAREGPT_ROLES.get(str(t.get("from")))
        if role is None:
            problems.append(f"{at}: unknown 'from' {t.get('from')!r}; use one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role or "user", "content": t.get("value")})
    problems += [
        p.replace("messages[", "conversations[").replace("'content'", "'value'")
        for p in check_messages(messages, where)
        if "unknown role" not in p
    ]
    if problems:
        return None, problems
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return Chat(_with_system(messages, opts)), []


def text(row: dict, where: str, opts: FormatOptions) -> Result:
    problems = not_object(row, where, '{"text": "..."}') or need(row, where, "text")
    return (None if problems else Plain("", row["text"], pack=True)), problems


def template(row: dict, where: str, opts: FormatOptions) -> Result:
    """`data.template` filled from the row's columns; from `{completion_field}` on is the completion."""
    problems = not_object(row, where, "an object with the template's fields")
    if problems:
        return None, problems
    pattern, start = opts.template or "", opts.completion_field or ""  # checked by the config
    fields = template_fields(pattern)
    problems = [p for f in fields for p in need(row, where, f, (str, int, float), "a string or number")]
    if problems:
        return None, problems
    cut = pattern.index("{" + start + "}")
    values = {f: str(row[f]) for f in fields}
    return Plain(pattern[:cut].format(**values), pattern[cut:].format(**values)), []


def preference(row: dict, where: str, opts: FormatOptions) -> Result:
    """OpenAI DPO rows ({input: {messages}, preferred_output, non_preferred_output}) or TRL's
    prompt/chosen/rejected (strings or message lists)."""
    problems = not_object(
        row, where, '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}'
    )
    if problems:
        return None, problems
    if "preferred_output" in row or "input" in row:
        inp = row.get("input")
        if not isinstance(inp, dict):
            return None, [f"{where}: 'input' must be an object with 'messages' (got {type(inp).__name__})"]
        problems = check_messages(inp.get("messages"), where, "input.messages", need_assistant=False)
        outputs = []
        for key in ("preferred_output", "non_preferred_output"):
            value = row.get(key)
            if key not in row:
                problems.append(f"{where}: missing key '{key}' (a list with one assistant message)")
            elif not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)):
                problems.append(f"{where}: '{key}' must be a list with exactly one assistant message")
            else:
                problems += check_messages(value, where, key, need_assistant=False)
                if value[0].get("role") != "assistant":
                    problems.append(f"{where}: {key}[0]: role must be 'assistant', got {value[0].get('role')!r}")
                outputs.append(value[0].get("content"))
        if problems:
            return None, problems
        prompt, (chosen, rejected) = _clean(inp["messages"]), outputs
    else:
        problems = need(row, where, "prompt", (str, list), "a string or a message list")
        for key in ("chosen", "rejected"):
            problems += need(row, where, key, (str, list), "a string or a message list")
        if problems:
            return None, problems
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        problems = check_messages(prompt, where, "prompt", need_assistant=False)
        chosen, rejected = (
            r[-1].get("content") if isinstance(r, list) and r and isinstance(r[-1], dict) else r
            for r in (row["chosen"], row["rejected"])
        )
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{where}: '{key}' must hold a non-empty assistant reply")
        if problems:
            return None, problems
        prompt = _clean(prompt)
    if prompt[-1]["role"] == "assistant":
        return None, [
            f"{where}: the prompt ends with an assistant message; it must end with the user turn the replies answer"
        ]
    return Preference(
        _with_system([dict(m, weight=0) if m["role"] == "assistant" else m for m in prompt], opts),
        str(chosen),
        str(rejected),
    ), []


FORMATS: dict[str, Callable[[Any, str, FormatOptions], Result]] = {
    "chat": chat,
    "prompt_completion": prompt_completion,
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "text": text,
    "template": template,
    "preference": preference,
}


def detect_format(rows: list, source: str) -> str:
    """The format the keys of the first object row point to."""
    first = next((r.value for r in rows if isinstance(r.value, dict)), None)
    if first is None:
        from phitune.errors import PhituneError

        raise PhituneError(f"{source}: no JSON object rows to detect the format from; each example must be an object")
    keys = set(first)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"preferred_output", "non_preferred_output"} & keys or {"chosen", "rejected"} <= keys:
        return "preference"
    if "instruction" in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys and len(keys - {"id", "meta", "metadata", "source"}) == 1:
        return "text"
    from phitune.errors import PhituneError

    raise PhituneError(
        f"{rows[0].where}: cannot tell the data format from the keys ({', '.join(sorted(map(str, keys)))}); "
        f"set data.format to one of {', '.join(FORMATS)}, or task.name for structured rows (classification, ner, ...)"
    )
