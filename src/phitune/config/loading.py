"""Reading a configuration: YAML text, shorthands and `--set` overrides in; one `Config` or one
`PhituneError` listing every problem (with its line and the closest valid key) out."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from phitune.config.checks import semantic_problems
from phitune.config.schema import _SECTIONS, Config
from phitune.errors import PhituneError
from phitune.methods import METHODS, foreign_key

# The shorthands of the contract: `model: DIR`, `method: lora`, `data: FILE`.
_SHORTHAND = {"model": "name_or_path", "method": "name", "data": "train", "task": "name"}


def _expand_shorthands(raw: dict) -> dict:
    out = dict(raw)
    for key, field in _SHORTHAND.items():
        if isinstance(out.get(key), str):
            out[key] = {field: out[key]}
    return out


def _valid_keys(section: str | None) -> list[str]:
    if section is None:
        return list(Config.model_fields)
    model = _SECTIONS.get(section)
    return list(model.model_fields) if model else []


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(choices)}"


def _key_lines(text: str) -> dict[str, int]:
    """Map 'a.b' key paths to 1-based YAML line numbers, so errors can point at the line."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(n: object, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)

    walk(node, "")
    return lines


_UNION_TAG = re.compile(r"[\[\]()'-]|^(str|int|float|bool|list|dict|none)$")


def _untagged(errors: Sequence[Mapping]) -> list[dict]:
    """pydantic names the union member that failed in the location (`batch_size.literal['auto']`,
    `batch_size.constrained-int`); the user's key is the location without it."""
    return [
        {**e, "loc": tuple(x for x in e["loc"] if not (isinstance(x, str) and _UNION_TAG.search(x)))} for e in errors
    ]


def _union_merged(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One line per key: 'input should be 'auto' or greater than 0 (got -1)', not one per member."""
    merged: dict[str, list[str]] = {}
    for path, msg in found:
        merged.setdefault(path, []).append(msg)
    out = []
    for path, msgs in merged.items():
        if len(msgs) == 1:
            out.append((path, msgs[0]))
            continue
        got = msgs[0][msgs[0].rfind(" (got ") :]
        wants = [m[: m.rfind(" (got ")].removeprefix("input should be ").split(",")[0] for m in msgs]
        out.append((path, "input should be " + " or ".join(dict.fromkeys(wants)) + got))
    return out


def _format_error(err: dict, section: str | None) -> tuple[str, str]:
    loc = [str(x) for x in err["loc"]]
    if section == "method" and loc and loc[0] in METHODS:  # the union's tag: the method named
        name, loc = loc[0], loc[1:]
        if err["type"] == "extra_forbidden" and (why := foreign_key(name, loc[-1])):
            return f"method.{loc[-1]}", why
    path = ".".join(([section] if section else []) + loc)
    value = err.get("input")
    if err["type"] == "union_tag_invalid":  # method.name
        return f"{path}.name", f"input should be {err['ctx']['expected_tags']} (got {err['ctx']['tag']!r})"
    if err["type"] == "extra_forbidden":
        return path, f"unknown key{_suggest(loc[-1], _valid_keys(section if len(loc) == 1 else None))}"
    if err["type"] == "missing":
        return path, "required key is missing"
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return path, f"{err['msg'][:1].lower()}{err['msg'][1:]} (got {shown})"


def parse_config(
    raw: Any, *, source: str = "config", text: str | None = None, given: dict[str, str] | None = None
) -> Config:
    """Validate a raw mapping; raise one PhituneError listing every problem. `given`: key path ->
    the command-line flag that set it (`--set training.learning_rate=x`), named instead of the file."""
    if not isinstance(raw, dict):
        raise PhituneError(
            f"{source}: expected a mapping of sections (model, method, data, task, training, distributed, "
            f"output_dir), got {type(raw).__name__}"
        )
    raw = _expand_shorthands(raw)
    lines = _key_lines(text) if text else {}
    problems: list[str] = []

    def where(path: str) -> str:
        flags = given or {}
        flag = next((flags[p] for p in _prefixes(path) if p in flags), None)
        if flag:
            return f"{flag}: {path}"
        line = lines.get(path)
        return f"{source}:{line}: {path}" if line else f"{source}: {path}"

    for key in raw:
        if key not in Config.model_fields:
            problems.append(f"{where(key)}: unknown section{_suggest(key, _valid_keys(None))}")
    sections: dict[str, Any] = {}
    for name, model in _SECTIONS.items():
        value = raw.get(name)
        if value is None:
            if name in ("model", "data"):
                problems.append(
                    f"{source}: {name}: required section is missing (e.g. `{name}: "
                    f"{'./models/tiny-phi3' if name == 'model' else 'data/train.jsonl'}`)"
                )
            continue
        if not isinstance(value, dict):
            problems.append(f"{where(name)}: expected a mapping, got {value!r}")
            continue
        try:
            sections[name] = model.model_validate(value)
        except ValidationError as exc:
            for path, msg in _union_merged([_format_error(err, name) for err in _untagged(exc.errors())]):
                problems.append(f"{where(path)}: {msg}")
    if "output_dir" in raw and not isinstance(raw["output_dir"], str):
        problems.append(f"{where('output_dir')}: expected a path string, got {raw['output_dir']!r}")
    problems += [f"{where(p)}: {m}" for p, m in semantic_problems(sections)]
    if problems:
        n = len(problems)
        raise PhituneError(f"{source}: {n} problem{'s' if n > 1 else ''} in the configuration", problems=problems)
    return Config(**sections, **({"output_dir": raw["output_dir"]} if "output_dir" in raw else {}))


def _prefixes(path: str) -> list[str]:
    """training.learning_rate -> [training.learning_rate, training]: a flag may have set either."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML scalars (1e-3, true, [a, b])."""
    raw = _expand_shorthands(raw)
    for item in overrides:
        if "=" not in item:
            raise PhituneError(f"--set {item!r}: expected section.key=value, e.g. --set training.learning_rate=1e-4")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value != "" else None
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if isinstance(node.get(part), str) and part in _SHORTHAND:
                node[part] = {_SHORTHAND[part]: node[part]}
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PhituneError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = parsed
        # `--set model=DIR` and friends keep working as shorthands.
        if len(parts) == 1 and isinstance(parsed, str) and parts[0] in _SHORTHAND:
            raw[parts[0]] = {_SHORTHAND[parts[0]]: parsed}
    return raw


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, flags: dict[str, str] | None = None
) -> Config:
    """The config file with `overrides` (section.key=value) applied; a problem in an override names
    the flag it came from (`flags`: override -> how it was typed, default `--set KEY=VALUE`)."""
    raw: dict = {}
    text = None
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise PhituneError(f"{p}: config file not found; pass the path of a YAML file (see examples/*.yaml)")
        text = p.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise PhituneError(
                f"{where}: invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax at that line"
            ) from None
    raw = apply_overrides(raw, overrides or [])
    given = {
        item.split("=", 1)[0].strip(): (flags or {}).get(item, f"--set {item}")
        for item in overrides or []
        if "=" in item
    }
    return parse_config(raw, source=source, text=text, given=given)
