"""phitune in its own process, for train_throughput.py: trains, then prints one JSON line."""

import json
import resource
import sys
from pathlib import Path

from phitune.cli import main

code = main(["train", *sys.argv[1:]])
if code:
    sys.exit(code)
out = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir=")))
records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
print(json.dumps({
    "exit": code, "steps": records[-1]["step"], "real_tokens": records[-1]["tokens_seen"],
    "train_seconds": records[-1]["elapsed_s"], "losses": [r["loss"] for r in records],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
