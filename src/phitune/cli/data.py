"""`phitune data validate`: a data file checked against a task and a model's tokenizer."""

from __future__ import annotations

import argparse
import json

from phitune.argtypes import positive_int
from phitune.cli.common import EXIT_USAGE
from phitune.errors import PhituneError
from phitune.registry import DATA_FORMATS


def cmd_data_validate(args: argparse.Namespace) -> int:
    """Every problem with file:line, then statistics; exit 1 when there are errors."""
    from phitune.config import load_config
    from phitune.data.dataset import read_split, statistics_of, summary_lines, tokenize_split
    from phitune.models import load_tokenizer

    if args.config:
        cfg = load_config(args.config, [f"data.train={args.file}", *(args.set or [])])
        data_cfg, task_cfg, model_cfg = cfg.data, cfg.task, cfg.model
    else:
        (data_cfg, task_cfg), model_cfg = _sections_from_flags(args), None
    if args.model:
        from phitune.config import ModelConfig

        model_cfg = ModelConfig(name_or_path=args.model)
    if args.format and args.config:
        data_cfg = data_cfg.model_copy(update={"format": args.format})
    split, spec = read_split(args.file, data_cfg, task_cfg)
    if model_cfg is not None and split.samples:
        tokenize_split(split, load_tokenizer(model_cfg), data_cfg.max_length, spec)
    stats = statistics_of(split, spec)
    if args.json:
        print(json.dumps(stats | {"problems": split.errors, "warnings": split.warnings}, indent=2))
    else:
        for line in split.errors:
            print(f"error: {line}")
        for line in split.warnings:
            print(f"warning: {line}")
        for line in summary_lines(stats):
            print(line)
        if model_cfg is None:
            print("(pass --model DIR_OR_HUB_ID for token counts and max_length checks)")
        print(f"{split.path}: " + (f"{len(split.errors)} error(s); fix them before training" if split.errors else "OK"))
    return 1 if split.errors else 0


def _sections_from_flags(args: argparse.Namespace) -> tuple:
    """(DataConfig, TaskConfig) from --format, --max-length, ... and --set data.* / task.*, without a
    config file; a bad value names the flag it came from."""
    from pydantic import ValidationError

    from phitune.config import DataConfig, TaskConfig, apply_overrides

    flags = {
        "data": {
            k: v
            for k, v in {
                "train": args.file,
                "format": args.format,
                "max_length": args.max_length,
                "template": args.template,
                "completion_field": args.completion_field,
            }.items()
            if v is not None
        },
        "task": {"name": args.task or "none"},
    }
    raw = apply_overrides(json.loads(json.dumps(flags)), args.set or [])
    other = sorted(set(raw) - {"data", "task"})
    if other:
        raise PhituneError(f"--set {other[0]}...: without --config only data.* and task.* keys apply here")
    try:
        data_cfg, task_cfg = DataConfig(**raw["data"]), TaskConfig(**raw["task"])
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        section = "task" if exc.title == "TaskConfig" else "data"
        given = flags[section].get(key) == err.get("input") and key in flags[section]
        source = f"--{ {'name': 'task'}.get(key, key).replace('_', '-') }" if given else f"--set {section}.{key}"
        raise PhituneError(f"{source}: {err['msg'][:1].lower()}{err['msg'][1:]} (got {err.get('input')!r})") from None
    return data_cfg, task_cfg


def register(sub: argparse._SubParsersAction) -> None:
    dp = sub.add_parser("data", help="check data files")
    dsub = dp.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    v = dsub.add_parser("validate", help="report every problem (file:line) and statistics; exit 1 on errors")
    v.add_argument("file", help="data file (.jsonl, .json, .csv, .parquet or a datasets directory)")
    v.add_argument("--format", choices=DATA_FORMATS)
    v.add_argument("--task", help="task preset: classification, ner, translation, qa, creative, chat, domain")
    v.add_argument("--model", help="model dir or hub id whose tokenizer counts tokens")
    v.add_argument("--max-length", type=positive_int, help="report examples longer than this (default 1024)")
    v.add_argument("--template", help="format template: the pattern, e.g. '### Text: {phrase}\\n### Tone: {tone}'")
    v.add_argument("--completion-field", help="format template: the field where the completion starts")
    v.add_argument("--config", help="take data, task and model settings from a training config")
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (with --config)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_data_validate)
    dp.set_defaults(func=lambda a: (dp.print_help(), EXIT_USAGE)[1])
