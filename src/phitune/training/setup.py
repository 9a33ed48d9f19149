"""The pieces a run is built from, before its loop: the output directory (resume or refuse),
the data with its warnings, precision, the model with its method, the engine with its optimizer
and learning-rate schedule, the step count and the metric that picks the best checkpoint."""

from __future__ import annotations

import copy
import logging
import math
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from phitune.config import Config, applicable, flatten
from phitune.data.dataset import TrainData, length_problem, load_training_data
from phitune.errors import PhituneError
from phitune.hardware import cpu_has_native_bf16
from phitune.methods import METHODS
from phitune.methods.lora import LoraFamilySettings
from phitune.models import apply_method, load_model
from phitune.outputs import list_checkpoints
from phitune.tasks import GENERATIVE_TASKS, TASKS, primary_metric
from phitune.training.compiling import compile_layers, decoder_parameters, why_compile
from phitune.training.distributed import Runtime
from phitune.training.engines import Engine, build_engine
from phitune.training.hyperparameters import chosen
from phitune.training.objectives import Objective

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedTokenizerBase

    from phitune.tasks import TaskSpec

log = logging.getLogger("phitune")

# Keys that may change between a run and its resumption without breaking exactness.
RESUMABLE_CHANGES = {
    "training.max_steps",
    "training.epochs",
    "training.save_every",
    "training.save_total_limit",
    "training.eval_every",
    "training.log_every",
    "training.tensorboard",
    "training.early_stopping_patience",
    "training.eval_generate",
    "training.keep_best",
}


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
            raise PhituneError(
                f"{out}: --resume given but there is no checkpoint in {out / 'checkpoints'}; set training.save_every "
                "and run without --resume"
            )
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

    before = flatten(applicable(yaml.safe_load(saved.read_text())))
    now = flatten(applicable(cfg.model_dump(mode="json")))
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise PhituneError(
            f"{saved}: the run started with a different configuration ({diffs}); resume with the same settings or "
            "use a new output_dir"
        )


def load_data(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> TrainData:
    data = load_training_data(cfg, tokenizer)
    for name, split in (("train", data.train), ("validation", data.validation)):
        if split and (split.truncated or split.dropped or split.duplicates):
            log.warning(
                "%s: %d example(s) truncated to data.max_length=%d, %d dropped with nothing left to train, "
                "%d exact duplicate(s)%s",
                name,
                split.truncated,
                cfg.data.max_length,
                len(split.dropped),
                split.duplicates,
                " removed" if name == "train" and cfg.data.dedupe else "",
            )
    message, refuse = length_problem(data.train, cfg.data.max_length, cfg.data.max_dropped)
    if refuse:
        raise PhituneError(message or "data.max_length")
    if message:
        log.warning("WARNING: %s", message)
    if data.leakage and (warning := data.leakage.warning(data.train.path)):
        log.warning("%s", warning)
    if data.packed:
        log.info(
            "packing: %d examples in %d sequences of up to %d tokens",
            data.num_train_examples,
            len(data.train_examples),
            cfg.data.max_length,
        )
    return data


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


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PhituneError("method: no trainable parameters; check method.target_modules")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=chosen(t.learning_rate, "learning_rate"))
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise PhituneError(
            f"training.optimizer={t.optimizer} needs bitsandbytes: pip install 'phitune[qlora]'"
        ) from exc
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[t.optimizer]
    return cls(groups, lr=t.learning_rate)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
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
    epochs = chosen(t.epochs, "epochs") or 1.0
    return max(1, math.ceil(epochs * math.ceil(num_examples / chosen(t.batch_size, "batch_size"))))


def setup_engine(
    cfg: Config,
    model: torch.nn.Module,
    accelerator: Accelerator,
    runtime: Runtime,
    precision: str,
    ds_config: dict | None,
    steps: int,
) -> tuple[Engine, LRScheduler]:
    """(the engine that wraps the model and its optimizer, the learning-rate schedule)."""
    built = {}  # the optimizer itself: the schedule drives it, whatever the engine wraps it in

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        built["optimizer"] = build_optimizer(cfg, module)
        return built["optimizer"]

    engine = build_engine(
        runtime.strategy,
        model=model,
        make_optimizer=make_optimizer,
        accelerator=accelerator,
        runtime=runtime,
        precision=precision,
        deepspeed_config=ds_config,
    )
    return engine, build_scheduler(cfg, built["optimizer"], steps)


def compile_for_run(
    cfg: Config,
    model: torch.nn.Module,
    runtime: Runtime,
    precision: str,
    device: torch.device,
    steps: int,
    data: TrainData,
) -> str | None:
    """Compile the decoder layers when training.compile asks for it (phitune/compiling.py); why, or None."""
    t = cfg.training
    unsupported = None
    if t.gradient_checkpointing:
        unsupported = "gradient checkpointing"
    elif "compile" in METHODS[cfg.method.name].limits:
        unsupported = METHODS[cfg.method.name].limits["compile"]
    elif runtime.strategy in ("deepspeed", "fsdp"):
        unsupported = f"strategy {runtime.strategy}"
    examples = data.train_examples
    mean_tokens = sum(len(e.input_ids) for e in examples) / max(len(examples), 1)
    param_tokens = float(decoder_parameters(model)) * mean_tokens * chosen(t.batch_size, "batch_size") * steps
    why = why_compile(
        t.compile,
        model,
        device=device,
        precision=precision,
        unsupported=unsupported,
        param_tokens=param_tokens,
        processes=runtime.world,
    )
    if why is not None:
        log.info("compiling %d decoder layers (%s); the first steps wait for it", compile_layers(model), why)
    return why


def scores_answers(cfg: Config, data: TrainData) -> bool:
    """Whether evaluations generate answers and score them with the task's metrics."""
    return (
        not data.spec.head
        and cfg.method.objective == "sft"
        and data.spec.name in GENERATIVE_TASKS
        and cfg.training.eval_generate > 0
        and bool(data.validation_samples)
    )


def setup_model(
    cfg: Config,
    accelerator: Accelerator,
    runtime: Runtime,
    precision: str,
    tokenizer: PreTrainedTokenizerBase,
    head: str,
    labels: list[str] | None,
) -> tuple[torch.nn.Module, torch.nn.Module | None, dict]:
    """(the model with its method applied, DPO's frozen reference or None, the weight counts for run.json)."""
    model = load_model(cfg, accelerator.device, precision, head=head, labels=labels)
    model.config.use_cache = False
    model.config.pad_token_id = tokenizer.pad_token_id  # the sequence-classification head finds the last token by it
    # DPO's reference for full fine-tuning is a frozen copy of the start (adapters switch themselves off instead).
    reference = (
        copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)
        if cfg.method.objective == "dpo" and not cfg.is_adapter
        else None
    )
    model = apply_method(model, cfg, tokenizer, head=head)
    weights = {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "weight_memory_mb": round(model.get_memory_footprint() / 2**20, 1),
    }
    mb = weights["weight_memory_mb"]
    log.info(
        "%s: %s trainable parameters, %s MB of weights%s",
        cfg.method.name,
        f"{weights['trainable_parameters']:,}",
        f"{mb:.2g}" if mb < 10 else f"{mb:.0f}",
        f"; {runtime.world} processes, {runtime.strategy}"
        if runtime.parallel or runtime.strategy == "deepspeed"
        else "",
    )
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, reference, weights


def check_best_metric(cfg: Config, data: TrainData, objective: Objective, answers_scored: bool) -> str:
    """training.best_metric resolved, and refused when this run's evaluation does not compute it."""
    best = resolve_best_metric(cfg, data.spec, answers_scored)
    if data.validation_examples and cfg.training.eval_every:
        computed = set(objective.eval_names) | set(TASKS[data.spec.name].metrics if answers_scored else ())
        if best not in computed:
            raise PhituneError(
                f"training.best_metric: {best} is not computed by this run's evaluation (it gives "
                f"{', '.join(sorted(computed))}); choose one of those"
                + ("" if answers_scored or data.spec.head else " or set task.name and training.eval_generate")
            )
    return best


def save_initial_adapter(cfg: Config, engine: Engine, runtime: Runtime, out: Path) -> Path | None:
    """PiSSA and OLoRA rewrite the base weights at initialisation. Saved as-is, their adapters would
    only work on that rewritten base; converted against the initial adapter (kept here), they
    become plain LoRA adapters (rank 2r) for the original base, like any other."""
    if not isinstance(cfg.method, LoraFamilySettings) or cfg.method.init not in ("pissa", "olora"):
        return None
    initial = out / "checkpoints" / "initial_adapter"
    if not (initial / "adapter_config.json").is_file():
        with engine.gathered():
            if runtime.is_main:
                engine.unwrap().save_pretrained(initial)
        runtime.barrier()
    return initial


def resolve_best_metric(cfg: Config, spec: TaskSpec, answers_scored: bool) -> str:
    """training.best_metric, with auto resolved: the task's primary metric when this run computes
    it (a head's, or one scored on generated answers), else the loss."""
    if cfg.training.best_metric != "auto":
        return cfg.training.best_metric
    return primary_metric(spec) if spec.head or answers_scored else "loss"
