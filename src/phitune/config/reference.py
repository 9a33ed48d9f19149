"""The configuration written out: flattened key paths, YAML, and the reference table."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml

from phitune.config.schema import _SECTIONS, Config
from phitune.methods import DEFAULT_METHOD, METHOD_KEYS


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config key paths and their values."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


def dump_config(cfg: Config) -> str:
    """The whole config as YAML (config.yaml of a run, a job, a ConfigMap), without the method keys
    its method does not read: loaded again, it passes the same checks."""
    return yaml.safe_dump(applicable(cfg.model_dump(mode="json")), sort_keys=False)


def applicable(data: dict) -> dict:
    """A dumped config (a plain dict) without the method keys its method does not read (a run's
    config.yaml written before they were dropped compares equal to one written after)."""
    method = data.get("method")
    if not isinstance(method, dict):
        return data
    name = method.get("name", DEFAULT_METHOD)
    return data | {"method": {k: v for k, v in method.items() if name in METHOD_KEYS.get(k, (name,))}}


def _type_name(ann) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is Annotated:  # PositiveInt and the like: the type, its bound is in the description
        return f"{_type_name(args[0])} > 0"
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """Every key with its type, default and description: docs/reference/config.md and `phitune config-reference`."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, model in _SECTIONS.items():
        for name, field in model.model_fields.items():
            value = field.default_factory() if field.default_factory else field.default
            default = "required" if field.is_required() else f"`{json.dumps(value)}`"
            readers = METHOD_KEYS[name] if section == "method" else ()
            only = f" Read by {', '.join(readers)}." if 0 < len(readers) < len(METHOD_KEYS["name"]) else ""
            rows.append(
                f"| `{section}.{name}` | {_type_name(field.annotation)} | {default} | {field.description}{only} |"
            )
    rows.append(f'| `output_dir` | str | `"runs/latest"` | {Config.model_fields["output_dir"].description} |')
    return "\n".join(rows)
