"""metrics.jsonl (one JSON object per logged step) and, when installed, TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from phitune.outputs import replace_file

log = logging.getLogger("phitune")


class MetricsLog:
    def __init__(self, out: Path, *, tensorboard: str, resume_step: int | None) -> None:
        self.path = out / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)
        self.tb = None
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
            except ImportError:
                if tensorboard == "on":
                    log.warning(
                        "training.tensorboard=on but tensorboard is not installed: pip install 'phitune[tensorboard]'"
                    )

    def _truncate_after(self, step: int) -> None:
        """A killed run may have logged steps after its last checkpoint; the resumed run logs them again."""
        if not self.path.exists():
            self.path.write_text("")
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        replace_file(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, also while a run is writing it: nothing when the file is not
    there yet, and a last line still being written is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc), else since this module was imported."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


class Startup:
    """Where the time from the process's start to training went, phase by phase (run.json's
    `startup_s`): what a user waits for before the first step and the first checkpoint."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"imports_and_config": round(process_age(), 2)}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 2)
        self._last = now

    def reached(self, milestone: str) -> None:
        """The first time MILESTONE happens: seconds since the process started."""
        if milestone not in self.seconds:  # called on every step: /proc is read once
            self.seconds[milestone] = round(process_age(), 2)
