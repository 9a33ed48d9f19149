"""`phitune demo`: the main job on the embedded default, end to end, no downloads.

Creates an untrained model, fine-tunes it with LoRA on the café-support chat data shipped in
examples/data, and prints before/after numbers on the held-out conversations: loss, perplexity,
mean token accuracy and exact match of the greedy reply.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from phitune.errors import PhituneError

console = Console()


def phitune_command() -> str:
    """How to call phitune from this shell: `phitune` when it is on PATH, else the script beside
    this Python (`.venv/bin/phitune` after `make demo` without an activated venv)."""
    if shutil.which("phitune"):
        return "phitune"
    beside = Path(sys.executable).parent / "phitune"
    return str(beside) if beside.is_file() else f"{sys.executable} -m phitune"


def held_out_scores(model, tokenizer, val_rows, examples, pad_id) -> dict:
    from phitune.evaluate.lm import lm_metrics
    from phitune.generate import chat_complete

    scores = lm_metrics(model, examples, batch_size=16, pad_id=pad_id, device=model.device)
    hits, samples = 0, []
    for messages in val_rows:
        prompt, expected = messages[:-1], messages[-1]["content"]
        reply = chat_complete(model, tokenizer, prompt, max_new_tokens=32)
        hits += reply == expected
        if len(samples) < 3:
            samples.append({"user": prompt[-1]["content"], "expected": expected, "reply": reply})
    scores["exact_match"] = hits / len(val_rows)
    return scores | {"samples": samples}


def run_demo(output: str = "runs/demo", arch: str = "phi3", preset: str = "tiny", data_dir: str = "examples/data",
             max_steps: int | None = None) -> dict:
    from phitune.config import parse_config
    from phitune.create_model import create_model
    from phitune.data.dataset import tokenize_file
    from phitune.models import load_for_inference
    from phitune.recipes.sft import train

    data = Path(data_dir)
    train_file, val_file = data / "support_train.jsonl", data / "support_val.jsonl"
    if not train_file.is_file() or not val_file.is_file():
        raise PhituneError(f"{data}: demo data not found (support_train.jsonl, support_val.jsonl); run from the phitune "
                           "repository root or pass --data-dir examples/data")
    out = Path(output)
    base = out / f"base-{arch}-{preset}"
    started = time.perf_counter()
    if not (base / "config.json").is_file():
        console.print(f"[bold]1/4[/] creating an untrained {arch} model ({preset}) in {base}")
        create_model(base, arch, preset, overwrite=True)
    else:
        console.print(f"[bold]1/4[/] reusing the untrained model in {base}")

    model, tokenizer = load_for_inference(str(base))
    val_split = tokenize_file(tokenizer, str(val_file), 512)
    val_rows, val_examples = [s.messages for _, s in val_split.samples], val_split.examples
    console.print(f"[bold]2/4[/] scoring the untrained model on {len(val_rows)} held-out conversations")
    before = held_out_scores(model, tokenizer, val_rows, val_examples, tokenizer.pad_token_id)

    cfg = parse_config({
        "model": str(base), # The head is adapted too: an untrained model's frozen random head cannot make confident predictions.
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear", "lm_head"]},
        "data": {"train": str(train_file), "validation": str(val_file), "max_length": 512},
        "training": {"max_steps": max_steps or 500, "learning_rate": 3e-3, "batch_size": 16, "lr_scheduler": "cosine",
                     "warmup_steps": 10, "log_every": 1, "eval_every": 100, "save_every": 100, "seed": 0},
        "output_dir": str(out / "run"),
    }, source="demo")
    console.print(f"[bold]3/4[/] fine-tuning with LoRA for {cfg.training.max_steps} steps")
    result = train(cfg, overwrite=True)

    console.print("[bold]4/4[/] scoring the fine-tuned model on the same held-out conversations")
    model, tokenizer = load_for_inference(str(base), str(result.artifact))
    after = held_out_scores(model, tokenizer, val_rows, val_examples, tokenizer.pad_token_id)

    table = Table(title="held-out conversations: before and after LoRA fine-tuning")
    table.add_column("metric")
    table.add_column("untrained base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for key, fmt in (("loss", "{:.3f}"), ("perplexity", "{:.1f}"), ("mean_token_accuracy", "{:.1%}"), ("exact_match", "{:.1%}")):
        table.add_row(key, fmt.format(before[key]), fmt.format(after[key]))
    console.print(table)
    for s in after["samples"]:
        console.print(f"  user: {s['user']}\n  fine-tuned: {s['reply']}\n  expected:   {s['expected']}")
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    report = {"before": before, "after": after, "train_loss_first": [first["step"], first["loss"]],
              "train_loss_last": [last["step"], last["loss"]],
              "seconds": round(time.perf_counter() - started, 1), "base_model": str(base), "run": str(result.output_dir)}
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(
        f"\ntrain loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}; "
        f"demo took {report['seconds']} s.\n"
        f"written:\n  untrained base model   {base}\n  LoRA adapter (PEFT)    {result.artifact}\n"
        f"  per-step metrics       {result.output_dir / 'metrics.jsonl'}\n  checkpoints            {result.output_dir / 'checkpoints'}\n"
        f"  run card               {result.output_dir / 'README.md'}\n  before/after report    {out / 'demo_report.json'}\n"
        f"try: {phitune_command()} generate {result.output_dir} --prompt 'what is the wifi password?'"
    )
    return report
