"""phitune in its own process, for train_throughput.py: trains, then prints one JSON line.

Memory: VmHWM is the whole process (checkpoint loading included); a sampling thread also
records RSS every 2 ms so the peak of the training loop alone can be reported.
"""

import json
import sys
import threading
import time
from pathlib import Path

import psutil

from phitune.cli import main
from phitune.training.allocator import reexec_with_tcmalloc

reexec_with_tcmalloc([sys.executable, *sys.argv])  # as `phitune train` does when it is a program

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_rss_mb  # noqa: E402

samples: list[tuple[float, float]] = []


def sample(proc=psutil.Process()):
    while True:
        samples.append((time.time(), proc.memory_info().rss / 2**20))
        time.sleep(0.002)


threading.Thread(target=sample, daemon=True).start()
code = main(["train", *sys.argv[1:]])
if code:
    sys.exit(code)
out = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir=")))
records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
run = json.loads((out / "run.json").read_text())
train_start = records[0]["time"] - records[0]["elapsed_s"]
print(
    json.dumps(
        {
            "exit": code,
            "steps": records[-1]["step"],
            "real_tokens": records[-1]["tokens_seen"],
            "train_seconds": records[-1]["elapsed_s"],
            "train_start": train_start,
            "losses": [r["loss"] for r in records],
            "peak_rss_mb": peak_rss_mb(),
            "weight_memory_mb": run["weight_memory_mb"],
            "trainable_parameters": run["trainable_parameters"],
            "train_peak_rss_mb": max(rss for t, rss in samples if train_start <= t <= records[-1]["time"]),
        }
    )
)
