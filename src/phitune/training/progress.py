"""The live progress line: step, loss, lr, real tokens/s, ETA. Plain log lines when not a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

console = Console(stderr=True)


class Progress:
    def __init__(self, total: int, start: int = 0) -> None:
        self.live = console.is_terminal
        self.total = total
        # Without a terminal, about 25 plain lines per run (plus every evaluation), not one per step.
        self.every = max(1, total // 25)
        self.bar = None
        if self.live:
            self.bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, loss: float, lr: float, tps: float, record: dict | None) -> None:
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s"
        evaluated = "  ".join(f"{k} {v:.4f}" for k, v in (record or {}).items() if k.startswith("eval_"))
        if evaluated:
            info += f"  {evaluated}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
            if evaluated:
                self.bar.console.print(f"step {step}: {evaluated}")
        elif record and (step == 1 or step % self.every == 0 or step == self.total or "eval_loss" in record):
            print(f"step {step}  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
