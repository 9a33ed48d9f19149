"""One way for the benchmarks to run a step in its own process, its output kept in a log file."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` from the repository root, its output into `log`; the wall seconds it took. A
    failure ends the benchmark, naming the log."""
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started
