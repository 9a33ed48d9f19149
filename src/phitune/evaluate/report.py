"""`phitune compare`: several models on one held-out set, and the "before and after" report.

Every model is asked the same questions in the same words: the task spec and data options come
from the first fine-tuned model (or `--task`), so a base model is scored on exactly the prompts
its fine-tune was trained with. Writes comparison.json, report.md, report.html (self-contained,
the chart inline) and chart.png: one group of bars per metric, one bar per model.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

from phitune.errors import PhituneError
from phitune.evaluate.runner import Evaluated, Subject, evaluate_model, metric_keys, resolve_spec
from phitune.tasks import primary_metric, scoring

if TYPE_CHECKING:
    from phitune.tasks import TaskSpec

# Scores reported as fractions (0..1); the chart shows them in percent. BLEU and chrF are 0..100 already.
HUNDRED_SCALE = {"bleu", "chrf"}


def compare(
    subjects: list[Subject],
    names: list[str],
    data_file: str,
    output: Path,
    *,
    task: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    limit: int | None = None,
) -> dict:
    teacher = next((s for s in subjects if s.spec is not None), None)
    spec = resolve_spec(teacher or subjects[0], data_file, task)
    options = (teacher or subjects[0]).data_options
    train_file = next((s.train_file for s in subjects if s.train_file), None)
    results = [
        evaluate_model(
            s,
            data_file,
            name=n,
            task=task,
            spec=spec,
            data_options=options,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            limit=limit,
            train_file=train_file,
        )
        for s, n in zip(subjects, names)
    ]
    output.mkdir(parents=True, exist_ok=True)
    primary = primary_metric(spec)
    if primary not in results[0].metrics:  # e.g. preference pairs: scored by preference_accuracy
        primary = next(iter(chart_metrics(spec, results)), "loss")
    comparison = {
        "data": str(data_file),
        "task": spec.name,
        "primary_metric": primary,
        "baseline": names[0],
        "models": [r.as_json() for r in results],
        "deltas": deltas(results),
    }
    (output / "comparison.json").write_text(json.dumps(comparison, indent=2, ensure_ascii=False) + "\n")
    charted = chart_metrics(spec, results)
    chart(
        results,
        charted,
        output / "chart.png",
        title=f"{spec.name}: before and after fine-tuning ({Path(data_file).name})",
    )
    (output / "report.md").write_text(markdown(comparison, results, primary))
    (output / "report.html").write_text(html_report(comparison, results, output / "chart.png"))
    return comparison


def deltas(results: list[Evaluated]) -> dict:
    """Each model's change against the first (the baseline), metric by metric."""
    base = scoring.headline(results[0].metrics)
    return {r.name: {k: v - base[k] for k, v in scoring.headline(r.metrics).items() if k in base} for r in results[1:]}


def chart_metrics(spec: TaskSpec, results: list[Evaluated]) -> list[str]:
    """The task's scores (higher is better) present for every model; perplexity only for tasks
    with no other score."""
    present = set.intersection(*(set(scoring.headline(r.metrics)) for r in results))
    wanted = list(
        dict.fromkeys(
            [primary_metric(spec)]
            + list(spec.metrics)
            + ["macro_f1", "entity_precision", "entity_recall", "mc1", "mc2", "accuracy", "accuracy_norm"]
        )
    )
    scores = [k for k in wanted if k in present and k not in scoring.LOWER_IS_BETTER]
    others = [
        k
        for r in results[:1]
        for k in scoring.headline(r.metrics)
        if k in present and k not in scoring.LOWER_IS_BETTER and k not in scores and k != "logp_margin"
    ]
    return scores or others or [k for k in ("perplexity",) if k in present]


def chart(results: list[Evaluated], keys: list[str], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PhituneError("the comparison chart needs matplotlib: pip install 'phitune[eval]'") from exc
    scale = {k: 1.0 if k in HUNDRED_SCALE or k in scoring.LOWER_IS_BETTER else 100.0 for k in keys}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(keys) * max(1, len(results)) / 2 + 2), 4.2), dpi=110)
    width = 0.8 / len(results)
    colors = ["#9aa5b1", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for j, r in enumerate(results):
        values = [r.metrics[k] * scale[k] for k in keys]
        xs = [i + (j - (len(results) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, values, width * 0.95, label=r.name, color=colors[j % len(colors)])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(keys)), [k + ("" if scale[k] == 1.0 else " (%)") for k in keys])
    lower = keys == ["perplexity"]
    ax.set_ylabel("perplexity (lower is better)" if lower else "score (higher is better)")
    if not lower:
        ax.set_ylim(0, max(100.0, max(r.metrics[k] * scale[k] for r in results for k in keys) * 1.18))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _rows(comparison: dict, results: list[Evaluated]) -> tuple[list[str], list[list[str]]]:
    keys = metric_keys(results)
    header = ["metric"] + [r.name for r in results] + [f"Δ {r.name}" for r in results[1:]]
    rows = []
    for k in keys:
        row = [k + (" ↓" if k in scoring.LOWER_IS_BETTER else "")] + [_cell(r.metrics.get(k, "-")) for r in results]
        row += [
            f"{comparison['deltas'][r.name][k]:+.4f}" if k in comparison["deltas"][r.name] else "-" for r in results[1:]
        ]
        rows.append(row)
    return header, rows


def markdown(comparison: dict, results: list[Evaluated], primary: str) -> str:
    header, rows = _rows(comparison, results)
    lines = [
        f"# Comparison on {comparison['data']}",
        "",
        f"Task: **{comparison['task']}**, {results[0].examples} held-out examples; primary metric: **{primary}**; "
        f"deltas against **{comparison['baseline']}**. ↓ lower is better.",
        "",
        "![before and after](chart.png)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Models:", ""] + [f"- **{r.name}**: `{r.path}`" for r in results]
    for r in results:
        if r.leakage and (r.leakage.exact or r.leakage.same_input):
            lines += ["", f"Warning ({r.name}): {r.leakage.warning('the training data')}"]
    confusion = [(r.name, r.metrics["confusion"]) for r in results if "confusion" in r.metrics]
    for name, matrix in confusion:
        columns = list(next(iter(matrix.values()), {}))
        lines += [
            "",
            f"Confusion matrix, {name} (rows: reference, columns: prediction):",
            "",
            "| | " + " | ".join(columns) + " |",
            "|" + "---|" * (len(columns) + 1),
        ]
        lines += [f"| {ref} | " + " | ".join(str(matrix[ref][c]) for c in columns) + " |" for ref in matrix]
    sample = [r for r in results if r.predictions]
    if sample:
        lines += [
            "",
            "Examples (first 5):",
            "",
            "| input | reference | " + " | ".join(r.name for r in sample) + " |",
            "|" + "---|" * (len(sample) + 2),
        ]
        for i in range(min(5, len(sample[0].predictions))):
            p = sample[0].predictions[i]
            cells = [_short(p["prompt"]), _short(p["reference"])] + [
                _short(r.predictions[i]["prediction"]) for r in sample
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def html_report(comparison: dict, results: list[Evaluated], png: Path) -> str:
    header, rows = _rows(comparison, results)
    image = base64.b64encode(png.read_bytes()).decode()
    esc = html.escape
    table = (
        "<table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )
    models = "".join(f"<li><b>{esc(r.name)}</b>: <code>{esc(r.path)}</code></li>" for r in results)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>phitune comparison</title><style>"
        "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
        f"</style></head><body><h1>Comparison on {esc(comparison['data'])}</h1>"
        f"<p>Task <b>{esc(comparison['task'])}</b>, {results[0].examples} held-out examples; primary metric "
        f"<b>{esc(comparison['primary_metric'])}</b>; deltas against <b>{esc(comparison['baseline'])}</b>.</p>"
        f"<img alt='before and after' src='data:image/png;base64,{image}'>{table}<ul>{models}</ul></body></html>\n"
    )
