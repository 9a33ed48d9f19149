"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint is written to `step-NNNNNN.tmp/` and renamed into place only when complete, so a run
killed while saving leaves the previous checkpoint as the latest one. Trainable weights are saved
exactly (their own dtype, safetensors), which is what makes a resumed run bit-for-bit on CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from phitune.errors import PhituneError

PREFIX = "step-"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # batches of `epoch` already consumed
    tokens_seen: int = 0
    trained_tokens: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


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


def save_checkpoint(root: Path, model, optimizer, scheduler, state: TrainState, *, save_adapter, keep: int | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    if save_adapter is not None:
        save_adapter(tmp / "adapter")  # a usable PEFT adapter for this step
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise PhituneError(
            f"{path}: checkpoint does not match this model/method ({len(missing)} trainable tensors missing, e.g. {missing[0]}); "
            "resume with the configuration the run started with"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return TrainState(**json.loads((path / "state.json").read_text()))
