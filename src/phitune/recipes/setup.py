"""The pieces a run is built from, before its loop: the output directory (resume or refuse),
the data with its warnings, precision, optimizer, learning-rate schedule and step count."""

from __future__ import annotations

import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from phitune.config import Config, flatten
from phitune.data.dataset import TrainData, length_problem, load_training_data
from phitune.errors import PhituneError
from phitune.outputs import list_checkpoints

log = logging.getLogger("phitune")

# Keys that may change between a run and its resumption without breaking exactness.
RESUMABLE_CHANGES = {"training.max_steps", "training.epochs", "training.save_every", "training.save_total_limit",
                     "training.eval_every", "training.log_every", "training.tensorboard", "training.early_stopping_patience",
                     "training.eval_generate", "training.keep_best"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(cfg: Config, *, resume: bool, overwrite: bool, is_main: bool = True) -> Path | None:
    """Return the checkpoint to resume from (or None), refusing to clobber a previous run. Every
    process checks (they all stop with the same error); only the main one deletes."""
    out = Path(cfg.output_dir)
    checkpoints = list_checkpoints(out / "checkpoints")
    if resume:
        if not checkpoints:
            raise PhituneError(f"{out}: --resume given but there is no checkpoint in {out / 'checkpoints'}; set training.save_every and run without --resume")
        saved = out / "config.yaml"
        if saved.is_file():
            _check_resumable(saved, cfg)
        return checkpoints[-1]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PhituneError(
                f"{out}: output_dir already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or choose another output_dir"
            )
        if is_main:
            shutil.rmtree(out)
    return None


def replaceable(out: Path) -> bool:
    """Whether `--auto-resume` may start `out` over: it is missing or empty, or it holds a phitune
    run whose saved config names this same output_dir. Anything else is somebody's data."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return True
    saved = out / "config.yaml"
    try:
        import yaml

        named = yaml.safe_load(saved.read_text()).get("output_dir")
        return Path(named).resolve() == out.resolve()
    except (OSError, AttributeError, TypeError, ValueError):
        return False


def _check_resumable(saved: Path, cfg: Config) -> None:
    import yaml

    before = flatten(yaml.safe_load(saved.read_text()))
    now = flatten(cfg.model_dump(mode="json"))
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise PhituneError(f"{saved}: the run started with a different configuration ({diffs}); resume with the same settings or use a new output_dir")


def load_data(cfg: Config, tokenizer) -> TrainData:
    data = load_training_data(cfg, tokenizer)
    for name, split in (("train", data.train), ("validation", data.validation)):
        if split and (split.truncated or split.dropped or split.duplicates):
            log.warning("%s: %d example(s) truncated to data.max_length=%d, %d dropped with nothing left to train, "
                        "%d exact duplicate(s)%s", name, split.truncated, cfg.data.max_length, len(split.dropped),
                        split.duplicates, " removed" if name == "train" and cfg.data.dedupe else "")
    message, refuse = length_problem(data.train, cfg.data.max_length, cfg.data.max_dropped)
    if refuse:
        raise PhituneError(message)
    if message:
        log.warning("WARNING: %s", message)
    if data.leakage and (warning := data.leakage.warning(data.train.path)):
        log.warning("%s", warning)
    if data.packed:
        log.info("packing: %d examples in %d sequences of up to %d tokens", data.num_train_examples,
                 len(data.train_examples), cfg.data.max_length)
    return data


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls at ~2x fp32 speed. Elsewhere bf16 is emulated and slower."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch
        return False


def resolve_precision(cfg: Config) -> str:
    p = cfg.training.precision
    cuda = torch.cuda.is_available()
    if p == "auto":
        if not cuda:
            return "bf16" if cpu_has_native_bf16() else "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if p == "fp16" and not cuda:
        raise PhituneError("training.precision: fp16 needs a CUDA GPU; use bf16 (or fp32) on CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p]


def build_optimizer(cfg: Config, model):
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PhituneError("method: no trainable parameters; check method.target_modules")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.learning_rate)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise PhituneError(f"training.optimizer={t.optimizer} needs bitsandbytes: pip install 'phitune[qlora]'") from exc
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[t.optimizer]
    return cls(groups, lr=t.learning_rate)


def build_scheduler(cfg: Config, optimizer, total_steps: int):
    t = cfg.training
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if t.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(cfg: Config, num_examples: int) -> int:
    t = cfg.training
    if t.max_steps:
        return t.max_steps
    return max(1, math.ceil((t.epochs or 1.0) * math.ceil(num_examples / t.batch_size)))
