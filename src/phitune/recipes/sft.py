"""Fine-tuning, read top to bottom: setup -> train -> save.

One function per phase; the loop is plain PyTorch on Accelerate (device placement, mixed
precision, and later DeepSpeed/multi-process), with gradient accumulation done by hand so the loss
is normalised by the whole optimizer step's trained tokens (or examples, or pairs). What the loss
is comes from an objective (recipes/objectives.py): next-token SFT, a classification head, DPO.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phitune import hyperparameters
from phitune.checkpoint import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from phitune.config import Config, dump_config, flatten
from phitune.data.batching import epoch_batches, split_micro
from phitune.data.dataset import TrainData, length_problem, load_training_data, statistics_of
from phitune.distributed import DeepSpeedEngine, FsdpEngine, PlainEngine, peak_memory_mb, run_deepspeed_config, start
from phitune.errors import PhituneError
from phitune.evaluate import scoring
from phitune.generate import complete_batch
from phitune.models import HEADS, apply_method, load_model, load_tokenizer, num_virtual_tokens, write_base_quantization
from phitune.progress import Progress
from phitune.recipes.objectives import (
    DPO,
    SFT,
    SequenceClassification,
    TokenClassification,
    adapter_disabled,
    add_sums,
    evaluate,
    frozen_copy,
)
from phitune.registry import GENERATIVE_TASKS, TASKS
from phitune.runcard import write_run_card
from phitune.tracking import MetricsLog

log = logging.getLogger("phitune")

# Keys that may change between a run and its resumption without breaking exactness.
RESUMABLE_CHANGES = {"training.max_steps", "training.epochs", "training.save_every", "training.save_total_limit",
                     "training.eval_every", "training.log_every", "training.tensorboard", "training.early_stopping_patience",
                     "training.eval_generate", "training.keep_best"}


@dataclass
class RunResult:
    output_dir: Path
    state: TrainState
    final_train_loss: float | None
    eval_metrics: dict | None
    artifact: Path


# --- setup -------------------------------------------------------------------------------


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


def build_objective(cfg: Config, data: TrainData, tokenizer, virtual: int, reference=None):
    pad = tokenizer.pad_token_id
    if data.spec.head:
        if data.spec.name == "ner":
            return TokenClassification(pad, data.spec.tag_labels)
        return SequenceClassification(pad, data.spec.labels)
    if cfg.method.objective == "dpo":
        return DPO(pad, cfg.method.beta, frozen_copy(reference) if reference is not None else adapter_disabled)
    return SFT(pad, virtual)


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


# --- train ---------------------------------------------------------------------------------


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run (or resume) the fine-tuning described by `cfg`, in this process and any others started
    with it (torchrun, `phitune train --nproc N`, accelerate launch, deepspeed)."""
    t = cfg.training
    out = Path(cfg.output_dir)
    precision = resolve_precision(cfg)
    accelerator, runtime = start(cfg, precision)
    device = accelerator.device
    resume_from = prepare_output_dir(cfg, resume=resume, overwrite=overwrite, is_main=runtime.is_main)
    runtime.barrier()

    # Data first: a bad file fails in seconds, before the model is loaded.
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg, tokenizer)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        (out / "task.json").write_text(data.spec.to_json())
    cfg, chosen = hyperparameters.for_run(cfg, data, runtime.world)  # config.yaml keeps `auto`; run.json the choice
    t = cfg.training
    if chosen:
        log.info("auto: %s (%s)", ", ".join(f"{k} {v:g}" for k, v in chosen.items() if k != "why"), chosen["why"])

    seed_everything(t.seed)  # the same initial weights in every process
    head, labels = data.spec.model_head
    ds_config, zero3_loading = run_deepspeed_config(cfg, runtime)  # the second must live while the model loads
    model = load_model(cfg, device, precision, head=head, labels=labels)
    model.config.use_cache = False
    model.config.pad_token_id = tokenizer.pad_token_id  # the sequence-classification head finds the last token by it
    # DPO's reference for full fine-tuning is a frozen copy of the start (adapters switch themselves off instead).
    reference = copy.deepcopy(model).requires_grad_(False).eval().to(device) if cfg.method.objective == "dpo" and not cfg.is_adapter else None
    model = apply_method(model, cfg, tokenizer, head=head)
    weights = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "weight_memory_mb": round(model.get_memory_footprint() / 2**20, 1)}
    mb = weights["weight_memory_mb"]
    log.info("%s: %s trainable parameters, %s MB of weights%s", cfg.method.name, f"{weights['trainable_parameters']:,}",
             f"{mb:.2g}" if mb < 10 else f"{mb:.0f}",
             f"; {runtime.world} processes, {runtime.strategy}" if runtime.parallel or runtime.strategy == "deepspeed" else "")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = total_steps(cfg, len(data.train_examples))
    if runtime.strategy == "fsdp":  # the optimizer is built on the sharded parameters
        engine = FsdpEngine(model, lambda m: build_optimizer(cfg, m), runtime, precision, device)
        optimizer = engine.optimizer
    else:
        optimizer = build_optimizer(cfg, model)
        engine = (DeepSpeedEngine(model, optimizer, runtime, ds_config) if ds_config is not None
                  else PlainEngine(accelerator, model, optimizer, runtime))
    scheduler = build_scheduler(cfg, optimizer, steps)
    model = engine.model  # the model, or DeepSpeed's engine around it: train()/eval() switch both
    virtual = num_virtual_tokens(engine.unwrap())
    objective = build_objective(cfg, data, tokenizer, virtual, reference)
    answers_scored = (not data.spec.head and cfg.method.objective == "sft" and data.spec.name in GENERATIVE_TASKS
                      and t.eval_generate > 0 and bool(data.validation_samples))
    best_metric = resolve_best_metric(cfg, data.spec, answers_scored)
    if data.validation_examples and t.eval_every:
        computed = set(objective.eval_names) | set(TASKS[data.spec.name].metrics if answers_scored else ())
        if best_metric not in computed:
            raise PhituneError(f"training.best_metric: {best_metric} is not computed by this run's evaluation (it gives "
                               f"{', '.join(sorted(computed))}); choose one of those"
                               + ("" if answers_scored or data.spec.head else " or set task.name and training.eval_generate"))

    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, engine, scheduler, runtime)
        log.info("resumed from %s (step %d)", resume_from, state.step)
    elif runtime.parallel:
        torch.manual_seed(t.seed + runtime.rank)  # dropout differs between processes, as their examples do
    metrics = MetricsLog(out, tensorboard=t.tensorboard, resume_step=state.step if resume_from else None) if runtime.is_main else None

    # PiSSA and OLoRA rewrite the base weights at initialisation. Saved as-is, their adapters would
    # only work on that rewritten base; converted against the initial adapter, they become plain
    # LoRA adapters (rank 2r) for the original base, like any other.
    initial = out / "checkpoints" / "initial_adapter" if cfg.method.init in ("pissa", "olora") and cfg.is_adapter else None
    if initial is not None and not (initial / "adapter_config.json").is_file():
        with engine.gathered():
            if runtime.is_main:
                engine.unwrap().save_pretrained(initial)
        runtime.barrier()

    def save_adapter(path: Path) -> None:
        # Under ZeRO-3 every process gathers the adapter; only the main one writes it.
        state_dict = engine.adapter_state_dict()
        if runtime.is_main:
            engine.unwrap().save_pretrained(path, state_dict=state_dict,
                                            path_initial_model_for_weight_conversion=str(initial) if initial else None)
            tokenizer.save_pretrained(path)
            (path / "task.json").write_text(data.spec.to_json())
            if cfg.method.name == "qlora":
                write_base_quantization(path, cfg.method)

    def run_eval() -> dict:
        values = evaluate(objective, model, data.validation_examples, batch_size=t.batch_size, device=device,
                          autocast=accelerator.autocast, runtime=runtime, forward=engine.forward)
        if answers_scored:
            values |= generated_metrics(engine, tokenizer, data.spec, data.validation_samples[: t.eval_generate], runtime,
                                        batch_size=t.batch_size, autocast=accelerator.autocast)
        return values

    train_examples = data.train_examples
    lengths = [len(e.input_ids) for e in train_examples]
    eval_metrics: dict | None = None
    last_loss: float | None = None
    progress = Progress(total=steps, start=state.step) if runtime.is_main else None
    model.train()
    started = time.perf_counter() - state.elapsed_s
    try:
        while state.step < steps:
            batches = epoch_batches(lengths, t.batch_size, t.seed, state.epoch)
            while state.batch_index < len(batches) and state.step < steps:
                step_start = time.perf_counter()
                examples = [train_examples[i] for i in batches[state.batch_index]]
                lr = scheduler.get_last_lr()[0]
                # Every process knows the whole step batch, so the global count needs no message.
                step_tokens = objective.count(examples)
                real_tokens = sum(getattr(e, "num_tokens", None) or len(e.input_ids) for e in examples)  # pairs: both replies
                mine = runtime.shard(examples)
                loss_sum, sums = 0.0, {}
                for part in split_micro_padded(mine, t.gradient_accumulation_steps):
                    # A process short of examples (the last batch of an epoch) still runs a forward
                    # and backward, weighted zero: collectives need every process.
                    weight = 1.0 if part else 0.0
                    with accelerator.autocast():
                        loss, part_sums = engine.forward(objective.loss, part or examples[:1], device)
                    # Divide by the whole step's trained tokens (examples, pairs) over all processes
                    # and multiply by their number (gradients are averaged over processes): every
                    # token weighs the same, however the batch is split.
                    engine.backward(loss * (weight * runtime.world / step_tokens))
                    loss_sum += weight * float(loss)
                    add_sums(sums, {k: weight * v for k, v in part_sums.items()})
                grad_norm = engine.step(t.max_grad_norm)
                scheduler.step()
                loss_sum, sums = reduce_sums(runtime, loss_sum, sums)
                state.step += 1
                state.batch_index += 1
                state.tokens_seen += real_tokens
                state.trained_tokens += step_tokens
                last_loss = loss_sum / step_tokens
                if not math.isfinite(last_loss):
                    raise PhituneError(
                        f"training diverged at step {state.step} (loss {last_loss}); lower training.learning_rate "
                        f"(now {t.learning_rate}) or use precision fp32/bf16"
                    )
                tps = real_tokens / max(time.perf_counter() - step_start, 1e-9)
                state.elapsed_s = time.perf_counter() - started
                record = None
                if state.step % t.log_every == 0 or state.step == steps:
                    record = {"step": state.step, "epoch": state.epoch + state.batch_index / len(batches),
                              "loss": last_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tps,
                              **objective.metrics(sums, step_tokens), "trained_tokens": state.trained_tokens,
                              "tokens_seen": state.tokens_seen,
                              "elapsed_s": round(state.elapsed_s, 3), "time": round(time.time(), 3)}
                    if torch.cuda.is_available():
                        record["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                stop_early = False
                if data.validation_examples and t.eval_every and (state.step % t.eval_every == 0 or state.step == steps):
                    eval_metrics = run_eval()
                    record = (record or {"step": state.step}) | {f"eval_{k}": v for k, v in eval_metrics.items()}
                    improved = update_best(state, eval_metrics, best_metric)
                    stop_early = bool(t.early_stopping_patience) and state.evals_without_improvement >= t.early_stopping_patience
                    if improved and t.keep_best:
                        save_final(cfg, engine, tokenizer, out, save_adapter, data.spec.to_json(), runtime, name="best")
                        if runtime.is_main:
                            (out / "best" / "best.json").write_text(json.dumps(
                                {"step": state.step, "metric": best_metric, "value": state.best_value}) + "\n")
                if record and metrics:
                    metrics.write(record)
                if progress:
                    progress.update(state.step, last_loss, lr, tps, record)
                if t.save_every and (state.step % t.save_every == 0):
                    save_checkpoint(out / "checkpoints", engine, scheduler, state, runtime,
                                    save_adapter=save_adapter if cfg.is_adapter else None, keep=t.save_total_limit)
                if stop_early:
                    log.info("early stopping at step %d: eval %s did not improve for %d evaluations (best %.4f at step %d)",
                             state.step, best_metric, t.early_stopping_patience, state.best_value, state.best_step)
                    steps = state.step
            if state.batch_index >= len(batches):
                state.epoch, state.batch_index = state.epoch + 1, 0
    finally:
        if progress:
            progress.close()
        if metrics:
            metrics.close()

    # --- save ------------------------------------------------------------------------------
    if data.validation_examples and eval_metrics is None:
        eval_metrics = run_eval()
    artifact = save_final(cfg, engine, tokenizer, out, save_adapter, data.spec.to_json(), runtime)
    summary = {"steps": state.step, "epochs_completed": state.epoch, "trained_tokens": state.trained_tokens,
               "tokens_seen": state.tokens_seen, "train_examples": data.num_train_examples,
               "truncated_examples": data.train.truncated, "dropped_examples": len(data.train.dropped),
               "duplicates_removed": data.train.duplicates if cfg.data.dedupe else 0,
               "packed_sequences": len(train_examples) if data.packed else None,
               "data": statistics_of(data.train, data.spec), "task": data.spec.name, "objective": objective.name,
               "hyperparameters": {"epochs": t.epochs, "batch_size": t.batch_size, "learning_rate": t.learning_rate,
                                   "max_steps": t.max_steps, "auto": chosen},
               "model_class": HEADS[head], "num_labels": len(labels) if labels else None,
               "processes": runtime.world, "strategy": runtime.strategy, "peak_memory_per_process": runtime.gather(peak_memory_mb()),
               **weights, "final_train_loss": last_loss, "eval": eval_metrics, "elapsed_s": round(state.elapsed_s, 2),
               "best": {"metric": best_metric, "value": state.best_value, "step": state.best_step,
                        "saved": str(out / "best") if t.keep_best and state.best_step else None},
               "leakage": data.leakage.as_dict() if data.leakage else None,
               "artifact": str(artifact)}
    if runtime.is_main:
        (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_run_card(out, cfg, summary)
    runtime.barrier()
    return RunResult(out, state, last_loss, eval_metrics, artifact)


def split_micro_padded(examples: list, parts: int) -> list[list]:
    """`parts` micro-batches, empty ones included, so every process runs as many as the others."""
    micro = split_micro(examples, parts) if examples else []
    return micro + [[] for _ in range(parts - len(micro))]


def reduce_sums(runtime, loss_sum: float, sums: dict) -> tuple[float, dict]:
    keys = sorted(sums)
    total = runtime.all_reduce_sum([loss_sum] + [float(sums[k]) for k in keys])
    return total[0], dict(zip(keys, total[1:]))


def resolve_best_metric(cfg: Config, spec, answers_scored: bool) -> str:
    """training.best_metric, with auto resolved: the task's primary metric when this run computes
    it (a head's, or one scored on generated answers), else the loss."""
    if cfg.training.best_metric != "auto":
        return cfg.training.best_metric
    return scoring.primary_metric(spec) if spec.head or answers_scored else "loss"


def update_best(state: TrainState, values: dict, metric: str) -> bool:
    """Record this evaluation against the best so far; True when it is the new best."""
    value = values[metric]
    better = (value < state.best_value if metric in scoring.LOWER_IS_BETTER else value > state.best_value) \
        if state.best_value is not None else True
    if better:
        state.best_value, state.best_step, state.evals_without_improvement = value, state.step, 0
    else:
        state.evals_without_improvement += 1
    return better


def generated_metrics(engine, tokenizer, spec, samples: list, runtime, *, batch_size: int, autocast) -> dict:
    """The task metric on greedy answers to validation examples. Each process answers every
    world-th one; when the weights are sharded (ZeRO-3, FSDP) the processes generate in step
    (synced) and each makes as many calls as the others, padding with a repeat of a prompt."""
    asked = [s for _, s in samples if scoring.generative(s)]
    if not asked:
        return {}
    prompts, references = map(list, zip(*(scoring.prompt_and_reference(s) for s in asked)))
    mine = list(range(runtime.rank, len(asked), runtime.world))
    share = -(-len(asked) // runtime.world)
    padded = mine + [mine[0] if mine else 0] * (share - len(mine))
    model = engine.model  # DeepSpeed's engine or FSDP's root: generation runs inside their forward
    was_training = model.training
    model.eval()
    with autocast():
        # Through the engine's forward, as every other computation: under FSDP the root's weights
        # (embeddings, head) are only gathered there.
        answers = engine.forward(complete_batch, tokenizer, [prompts[i] for i in padded], batch_size,
                                 scoring.answer_budget(tokenizer, references), runtime.parallel and engine.sharded)
    model.train(was_training)
    by_index: dict[int, str] = {}
    for part in runtime.gather(list(zip(mine, answers[: len(mine)]))):
        by_index.update(part)
    return scoring.headline(scoring.score(spec, [by_index[i] for i in range(len(asked))], references))


def save_final(cfg: Config, engine, tokenizer, out: Path, save_adapter, data_spec_json: str, runtime,
               name: str | None = None) -> Path:
    """OUT/adapter (PEFT format) or OUT/model (transformers format), or OUT/<name>, tokenizer
    beside; sharded weights are gathered first, and only the main process writes."""
    target = out / (name or ("adapter" if cfg.is_adapter else "model"))
    tmp = out / (target.name + ".tmp")
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.is_adapter:
        save_adapter(tmp)
    else:
        model = engine.unwrap()
        with engine.gathered():
            # Sharded weights come back whole: inside ZeRO-3's gather, or from FSDP's full state dict.
            if hasattr(engine, "full_state_dict"):
                whole = engine.full_state_dict()
            elif getattr(engine, "stage", 0) == 3:
                whole = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                whole = None
            if runtime.is_main:
                model.config.use_cache = True
                model.save_pretrained(tmp, state_dict=whole)
                tokenizer.save_pretrained(tmp)
                (tmp / "task.json").write_text(data_spec_json)
    if runtime.is_main:
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target
