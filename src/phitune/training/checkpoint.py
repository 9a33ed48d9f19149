"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint is written to `step-NNNNNN.tmp/` and renamed into place only when complete, so a run
killed while saving leaves the previous checkpoint as the latest one. Weights and optimizer state
are written by the engine (engines.py): trainable weights exactly (their own dtype,
safetensors) for one process or data parallelism, DeepSpeed's own sharded checkpoint under ZeRO.
Each process keeps its own RNG state.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from phitune.errors import PhituneError
from phitune.outputs import checkpoint_dir, list_checkpoints, staged

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from phitune.training.distributed import Runtime
    from phitune.training.engines import Engine


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # batches of `epoch` already consumed
    tokens_seen: int = 0
    trained_tokens: int = 0
    best_value: float | None = None  # of training.best_metric, at best_step
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    engine: Engine,
    scheduler: LRScheduler,
    state: TrainState,
    runtime: Runtime,
    *,
    save_adapter: Callable[[Path], None] | None,
    keep: int | None,
) -> Path:
    """Every process takes part (DeepSpeed writes a shard per process; ZeRO-3 gathers the adapter);
    the main process writes the shared files and moves the finished directory into place."""
    final = checkpoint_dir(root, state.step)
    if runtime.is_main:
        root.mkdir(parents=True, exist_ok=True)
    with staged(final, writer=runtime.is_main) as tmp:
        if runtime.is_main:
            tmp.mkdir()
        runtime.barrier()
        engine.save_weights(tmp)
        torch.save(rng_state(), tmp / f"rng-{runtime.rank}.pt")
        if runtime.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state) | {"world_size": runtime.world}, indent=2) + "\n")
        if save_adapter is not None:
            save_adapter(tmp / "adapter")  # a usable PEFT adapter for this step
        runtime.barrier()
    if runtime.is_main and keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def load_checkpoint(path: Path, engine: Engine, scheduler: LRScheduler, runtime: Runtime) -> TrainState:
    saved = json.loads((path / "state.json").read_text())
    world = saved.pop("world_size", 1)
    if "best_eval_loss" in saved:  # checkpoints written before training.best_metric
        saved["best_value"] = saved.pop("best_eval_loss")
    if world != runtime.world:
        raise PhituneError(
            f"{path}: saved by {world} process(es), resumed with {runtime.world}; resume with the same "
            "number of processes (data order and optimizer shards depend on it)"
        )
    engine.load_weights(path)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{runtime.rank}.pt"
    set_rng_state(torch.load(rng if rng.is_file() else path / "rng.pt", weights_only=False))
    return TrainState(**saved)
