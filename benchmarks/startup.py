"""Start-up: how long `phitune train` takes to its first step and its first checkpoint, by phase,
against TRL's time to its first step; the real model, LoRA, in fresh processes.

    python benchmarks/startup.py [--repeats 3]

Each repeat runs both sides on the same 32 dictionary rows (2 steps of 16), one after the other.
phitune's phases come from its run.json (`startup_s`: imports and config, the accelerator and
output directory, tokenizer and data, the model with its method, the engine; then the moments
the first step and the first checkpoint were done, counted from the process's start). TRL's start-up
is process start to `trainer.train()`. Writes benchmarks/results/startup.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_data import REAL_MODEL, dictionary_chat, lora_sets  # noqa: E402
from train_throughput import phitune_child, run_child, trl_cmd  # noqa: E402

PHASES = (
    ("imports_and_config", "imports and config (process start to the recipe)"),
    ("accelerator_and_output_dir", "accelerator and output directory"),
    ("tokenizer_and_data", "tokenizer, reading and tokenising the data"),
    ("model", "model loaded, LoRA attached"),
    ("engine_and_resume", "optimizer, schedule, engine"),
    ("first_step_done", "**first step done** (since process start)"),
    ("first_checkpoint_written", "**first checkpoint written** (since process start)"),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=str(HERE / ".work"))
    args = p.parse_args()
    work = Path(args.work)
    data = dictionary_chat(work / "dictionary-32.jsonl", rows=32)
    phitune, trl = [], []
    for i in range(args.repeats):
        out = work / "startup-phitune"
        sets = [*lora_sets(data, out, batch_size=16), "training.save_every=1"]
        print(f"repeat {i + 1}: phitune ...", file=sys.stderr, flush=True)
        r = run_child(phitune_child(sets), work / "startup-phitune.log")
        phitune.append({**json.loads((out / "run.json").read_text())["startup_s"], "process": r["process_seconds"]})
        print(f"repeat {i + 1}: TRL ...", file=sys.stderr, flush=True)
        targs = argparse.Namespace(batch_size=16, max_length=128)
        r = run_child(trl_cmd(REAL_MODEL, data, work / "startup-trl", targs), work / "startup-trl.log")
        trl.append({"first_step_started": r["startup_seconds"], "process": r["process_seconds"]})

    def cell(runs: list[dict], key: str) -> str:
        values = [r[key] for r in runs if key in r]
        if not values:
            return "-"
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    lines = [
        f"SmolLM2-135M-Instruct, LoRA r=16 alpha 32 all-linear on both sides, 32 dictionary rows, batch 16, 2 steps, "
        f"save_every 1; {args.repeats} fresh processes per side; seconds, median (min-max).",
        "",
        "| phase | phitune | TRL SFTTrainer + PEFT |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {label} | {cell(phitune, key)} | - |" for key, label in PHASES[:5]]
    lines += [f"| first step started (since process start) | - | {cell(trl, 'first_step_started')} |"]
    lines += [f"| {label} | {cell(phitune, key)} | - |" for key, label in PHASES[5:]]
    lines += [f"| whole process (2 steps, saving included) | {cell(phitune, 'process')} | {cell(trl, 'process')} |"]
    table = "\n".join(lines)
    print(table)
    command = f"Command: `python benchmarks/startup.py {' '.join(sys.argv[1:])}`\n\n"
    (HERE / "results" / "startup.md").write_text(command + table + "\n")
    (HERE / "results" / "startup.json").write_text(json.dumps({"phitune": phitune, "trl": trl}, indent=2) + "\n")


if __name__ == "__main__":
    main()
