"""`phitune eval` and `phitune compare`: held-out scores with the task's metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phitune.argtypes import positive_int
from phitune.errors import PhituneError
from phitune.registry import EVAL_TASKS


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=positive_int, help="score only the first N examples")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="examples per forward / generate call (default 16)"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, help="answer length limit (default: longest reference + room)"
    )


def _eval_data(args: argparse.Namespace, subject) -> str:
    data = args.data or subject.validation_file
    if not data:
        raise PhituneError(f"{subject.path}: no held-out file to evaluate on; pass --data FILE")
    return data


def cmd_eval(args: argparse.Namespace) -> int:
    from phitune.evaluate.runner import evaluate_model, locate, table, write_outputs

    subject = locate(args.model, args.base)
    if args.harness:
        from phitune.evaluate.harness import run_harness

        results = run_harness(
            subject.base,
            subject.adapter,
            [t for t in args.harness.split(",") if t],
            include=args.harness_include,
            limit=args.limit,
            batch_size=args.batch_size,
        )
        output = (
            Path(args.output)
            if args.output
            else Path(args.model) / "eval"
            if Path(args.model).is_dir()
            else Path("eval")
        )
        output.mkdir(parents=True, exist_ok=True)
        (output / "harness.json").write_text(json.dumps(results, indent=2) + "\n")
        for task, values in results.items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        print(f"wrote {output / 'harness.json'}")
        return 0
    data = _eval_data(args, subject)
    result = evaluate_model(
        subject,
        data,
        task=args.task,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        train_file=args.train_file,
    )
    output = (
        Path(args.output)
        if args.output
        else (Path(args.model) / "eval" if subject.spec else Path("eval") / result.name)
    )
    write_outputs(result, output)
    if args.json:
        print(json.dumps(result.as_json(), indent=2, ensure_ascii=False))
        return 0
    print(f"{result.name} on {data}: task {result.task}, {result.examples} examples")
    print("\n".join(table([result])))
    print(f"wrote {output / 'metrics.json'} and {output / 'predictions.jsonl'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from phitune.evaluate.report import compare
    from phitune.evaluate.runner import locate

    subjects = [locate(m) for m in args.models]
    names = args.names.split(",") if args.names else [Path(m.rstrip("/")).name for m in args.models]
    if len(names) != len(subjects):
        raise PhituneError(
            f"--names: {len(names)} name(s) for {len(subjects)} models; give one per model, comma-separated"
        )
    if len(set(names)) != len(names):
        raise PhituneError(f"--names: models need distinct names, got {', '.join(names)}; pass --names base,tuned,...")
    tuned = next((s for s in subjects if s.validation_file), subjects[0])
    data = _eval_data(args, tuned)
    output = Path(args.output)
    comparison = compare(
        subjects,
        names,
        data,
        output,
        task=args.task,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
    )
    from phitune.evaluate.runner import Evaluated, table

    results = [Evaluated(m["name"], m["model"], m["task"], m["examples"], m["metrics"]) for m in comparison["models"]]
    print(
        f"task {comparison['task']} on {data} ({results[0].examples} examples); primary metric "
        f"{comparison['primary_metric']}"
    )
    print("\n".join(table(results)))
    print(f"wrote {output}/report.md, report.html, chart.png and comparison.json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="score a model on a held-out file with its task's metrics (metrics.json)")
    e.add_argument("model", help="training output dir, adapter dir, merged model, or base model (dir or hub id)")
    e.add_argument("--data", help="held-out file (default: the run's validation file)")
    e.add_argument("--task", choices=EVAL_TASKS, help="task to score with (default: the run's task.json)")
    e.add_argument("--base", help="base model for an adapter, when not the one in adapter_config.json")
    e.add_argument("--train-file", help="training data to check the held-out file against (default: the run's)")
    e.add_argument("--output", help="directory for metrics.json and predictions.jsonl (default: MODEL/eval)")
    _scoring_options(e)
    e.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    e.add_argument("--harness", metavar="TASKS", help="run lm-evaluation-harness tasks (comma-separated) instead")
    e.add_argument("--harness-include", metavar="DIR", help="directory of your own lm-evaluation-harness task YAMLs")
    e.set_defaults(func=cmd_eval)

    k = sub.add_parser("compare", help="several models on one held-out set: report.md/html, chart.png, comparison.json")
    k.add_argument("models", nargs="+", help="models, the baseline first (e.g. the base model, then fine-tunes)")
    k.add_argument("--data", help="held-out file (default: the first fine-tune's validation file)")
    k.add_argument("--task", choices=EVAL_TASKS, help="task to score with (default: the first fine-tune's task.json)")
    k.add_argument("--names", help="comma-separated names for the models (default: their directory names)")
    k.add_argument("--output", default="compare", help="report directory (default: compare)")
    _scoring_options(k)
    k.set_defaults(func=cmd_compare)
