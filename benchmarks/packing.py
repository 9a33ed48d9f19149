"""Packing vs length-grouped batches, side by side: real (non-pad) tokens per second.

Same model (`create-model --preset small`, ~28.5M), same data, same tokens per optimizer step,
one epoch each, modes interleaved so machine noise hits both alike. Two data sets: the short chat
conversations of the demo (27-94 tokens) and the raw domain text of examples/domain.

    python benchmarks/packing.py [--repeats 2]   # writes benchmarks/results/packing.{md,json}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = {
    "chat (demo, 480 short conversations)": REPO / "examples/data/support_train.jsonl",
    "raw text (examples/domain)": REPO / "examples/domain/train.jsonl",
}


def run(model: Path, data: Path, packing: str, out: Path, batch: int, max_length: int) -> dict:
    cfg = {
        "model": str(model),
        "method": {"name": "lora", "dropout": 0.0},
        "data": {"train": str(data), "max_length": max_length, "packing": packing, "dedupe": False},
        "training": {"epochs": 1, "batch_size": batch, "log_every": 1000, "seed": 0},
        "output_dir": str(out),
    }
    path = out.with_suffix(".json")
    path.write_text(json.dumps(cfg))
    subprocess.run(
        [sys.executable, "-m", "phitune", "train", str(path), "--overwrite"], check=True, capture_output=True, text=True
    )
    summary = json.loads((out / "run.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "elapsed_s": summary["elapsed_s"],
        "tokens": summary["tokens_seen"],
        "steps": summary["steps"],
        "tokens_per_second": summary["tokens_seen"] / summary["elapsed_s"],
        "final_loss": records[-1]["loss"],
    }


def padded_fraction(model: Path, data: Path, batch: int, max_length: int, packing: str) -> float:
    """Share of the computed positions that are padding, over one epoch's batches."""
    from transformers import AutoTokenizer

    from phitune.config import parse_config
    from phitune.data.batching import epoch_batches
    from phitune.data.dataset import load_training_data

    cfg = parse_config(
        {
            "model": str(model),
            "data": {"train": str(data), "max_length": max_length, "packing": packing, "dedupe": False},
            "training": {"batch_size": batch},
        }
    )
    examples = load_training_data(cfg, AutoTokenizer.from_pretrained(model)).train_examples
    lengths = [len(e.input_ids) for e in examples]
    computed = real = 0
    for b in epoch_batches(lengths, batch, 0, 0):
        computed += len(b) * max(lengths[i] for i in b)
        real += sum(lengths[i] for i in b)
    return 1 - real / computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from phitune.create_model import create_model

    work = Path(tempfile.mkdtemp(prefix="phitune-packing-"))
    model = work / "small"
    create_model(model, "phi3", "small")
    # ~768 real tokens per step in both modes: 16 conversations of ~48 tokens, or 3 packed rows of 256.
    modes = {"off": (16, 256), "on": (3, 256)}
    results = []
    for name, data in DATA.items():
        for mode, (batch, max_length) in modes.items():
            results.append(
                {
                    "data": name,
                    "packing": mode,
                    "batch_size": batch,
                    "max_length": max_length,
                    "padding": padded_fraction(model, data, batch, max_length, mode),
                    "runs": [],
                }
            )
        for r in range(args.repeats):
            for row in [x for x in results if x["data"] == name]:
                row["runs"].append(
                    run(
                        model,
                        data,
                        row["packing"],
                        work / f"{row['packing']}-{r}",
                        row["batch_size"],
                        row["max_length"],
                    )
                )
    lines = [
        "| data | packing | batch | padding | real tokens/s (best of runs) | final train loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results:
        best = max(x["tokens_per_second"] for x in row["runs"])
        row["best_tokens_per_second"] = best
        lines.append(
            f"| {row['data']} | {row['packing']} | {row['batch_size']} x <= {row['max_length']} | "
            f"{row['padding']:.1%} | {best:,.0f} | {row['runs'][-1]['final_loss']:.3f} |"
        )
    for name in DATA:
        off, on = (next(x for x in results if x["data"] == name and x["packing"] == m) for m in ("off", "on"))
        lines.append(
            f"\n{name}: packing / length-grouped speed = "
            f"{on['best_tokens_per_second'] / off['best_tokens_per_second']:.2f}x"
        )
    table = "\n".join(lines)
    print(table)
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "packing.md").write_text(table + "\n")
    (out / "packing.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
