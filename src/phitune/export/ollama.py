"""An Ollama Modelfile beside a GGUF export: FROM, ADAPTER, TEMPLATE, SYSTEM and PARAMETERs.

Ollama renders prompts with Go templates, not the Jinja chat template a fine-tune carries. The
Jinja template is rendered here over conversations with marker contents, cut into what comes
before and after each role's content, and written back as a Go template over `.Messages`; the
cut is kept only if it rebuilds the Jinja output for every test conversation exactly. A template
that does not cut that way (roles folded into each other) gets no TEMPLATE line: Ollama then
reads `tokenizer.chat_template` from the GGUF file itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

MARK = {"system": "PHITUNEsys{}X", "user": "PHITUNEusr{}X", "assistant": "PHITUNEast{}X"}


@dataclass
class Turns:
    """A chat template as text around each role's content."""

    start: str
    pre: dict[str, str]
    post: dict[str, str]
    generation: str
    default_system: str | None = None

    def render(self, messages: list[dict]) -> str:
        """What Ollama renders with the template and SYSTEM line written from these turns: the
        assistant's opening after a last message that is not the assistant's."""
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.pre[m["role"]] + m["content"] + self.post[m["role"]] for m in messages)
        return self.start + body + (self.generation if messages[-1]["role"] != "assistant" else "")

    def go_template(self) -> str:
        """Every piece of literal text as a quoted Go string, so no newline is lost to trimming."""

        def lit(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""  # a Go string literal

        opening = "{{ if $last }}" + lit(self.generation) + "{{ end }}" if self.generation else ""
        branches = "".join(
            ("{{ if" if i == 0 else "{{ else if")
            + f' eq .Role "{role}" }}}}'
            + lit(self.pre[role])
            + "{{ .Content }}"
            + lit(self.post[role])
            + (opening if role != "assistant" else "")
            for i, role in enumerate(("system", "user", "assistant"))
        )
        last = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        return lit(self.start) + "{{ range $i, $_ := .Messages }}" + last + branches + "{{ end }}{{ end }}"


def _conversation(roles: str) -> list[dict]:
    names = {"s": "system", "u": "user", "a": "assistant"}
    return [{"role": names[r], "content": MARK[names[r]].format(i)} for i, r in enumerate(roles)]


def _around(text: str, messages: list[dict]) -> list[str] | None:
    """The text before, between and after the messages' contents; None if one is missing."""
    pieces, at = [], 0
    for m in messages:
        found = text.find(m["content"], at)
        if found < 0:
            return None
        pieces.append(text[at:found])
        at = found + len(m["content"])
    return [*pieces, text[at:]]


def _cut(before: str, known: str, *, at_start: bool) -> str | None:
    if at_start:
        return before[len(known) :] if before.startswith(known) else None
    return before[: len(before) - len(known)] if before.endswith(known) else None


def derive_turns(render, eos: str | None = None) -> Turns | None:
    """`render(messages, generation_prompt) -> str` (the Jinja template) as Turns, or None.

    Without the generation prompt some templates close the text with eos (Phi-3): a chat server
    never renders that, so it is dropped before cutting. The result is kept only if it rebuilds
    the Jinja output of conversations awaiting a reply exactly."""

    def pieces(roles: str, generation_prompt: bool) -> list[str]:
        text = render(_conversation(roles), generation_prompt)
        if not generation_prompt and eos and text.endswith(eos):
            text = text[: -len(eos)]
        found = _around(text, _conversation(roles))
        if found is None:
            raise ValueError("a message's content is missing from the rendered template")
        return found

    try:
        head, s_to_u, u_to_a, a_to_u, tail = pieces("suau", True)
        post_u, post_a = pieces("su", False)[-1], pieces("sua", False)[-1]
        before_user = pieces("u", True)[0]
    except Exception:  # noqa: BLE001 - a template that raises on a role order, or lost a content
        return None
    pre_a, pre_u = _cut(u_to_a, post_u, at_start=True), _cut(a_to_u, post_a, at_start=True)
    generation = _cut(tail, post_u, at_start=True)
    post_s = _cut(s_to_u, pre_u, at_start=False) if pre_u is not None else None
    before = _cut(before_user, pre_u, at_start=False) if pre_u is not None else None
    if pre_a is None or pre_u is None or generation is None or post_s is None or before is None:
        return None
    pre = {"system": head, "user": pre_u, "assistant": pre_a}
    turns = Turns("", pre, {"system": post_s, "user": post_u, "assistant": post_a}, generation)
    if before and before.startswith(head) and before.endswith(post_s) and len(before) >= len(head) + len(post_s):
        turns.default_system = before[len(head) : len(before) - len(post_s)]
    elif head.startswith(before):
        turns.start, turns.pre["system"] = before, head[len(before) :]
    else:
        return None
    checks = ("u", "su", "uau", "suau", "suauau")
    if all(turns.render(_conversation(c)) == render(_conversation(c), True) for c in checks):
        return turns
    return None


def modelfile(files: dict[str, str], tokenizer, stops: list[str], sampling: dict, source: str, name: str) -> str:
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    turns = derive_turns(render, tokenizer.eos_token) if tokenizer.chat_template else None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.").lower() or "fine-tune"  # what `ollama create` takes
    lines = [
        f"# Written by `phitune export gguf` from {source}.",
        f"#   Ollama:    ollama create {name} -f Modelfile && ollama run {name}",
        "#   llama.cpp: llama-server -m "
        + (f"{files['base']} --lora {files['adapter']}" if "adapter" in files else files["model"])
        + " --jinja"
        + (f" --chat-template-file {files['chat_template']}" if "chat_template" in files else ""),
        f"FROM ./{files.get('model') or files['base']}",
    ]
    if "adapter" in files:
        lines.append(f"ADAPTER ./{files['adapter']}")
    if turns is not None:
        if tokenizer.bos_token and turns.start == tokenizer.bos_token:
            turns.start = ""  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token)
        lines.append(f'TEMPLATE """{turns.go_template()}"""')
        if turns.default_system is not None and '"""' not in turns.default_system:  # a Modelfile cannot quote it
            lines.append(f'SYSTEM """{turns.default_system}"""')
    elif tokenizer.chat_template:
        lines.append(
            "# No TEMPLATE: this chat template does not cut into per-role text; Ollama reads it from the GGUF."
        )
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in sampling.items()]
    return "\n".join(lines) + "\n"


def write_modelfile(
    folder: Path, files: dict[str, str], tokenizer, stops: list[str], sampling: dict, source: str, name: str
) -> None:
    text = modelfile(files, tokenizer, stops, sampling, source, name)
    (folder / "Modelfile").write_text(text, encoding="utf-8")
