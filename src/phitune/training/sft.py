"""Fine-tuning, read top to bottom: `train` = `setup` -> `fit` -> `finish`.

The loop is plain PyTorch on Accelerate (device placement, mixed precision) and an engine
(engines.py: one process or DDP, DeepSpeed ZeRO, FSDP2), with gradient accumulation done by hand
so the loss is normalised by the whole optimizer step's trained tokens (or examples, or pairs).
What the loss is comes from an objective (objectives.py): next-token SFT, a
classification head, DPO. The pieces a run is built from (model, engine, schedule) are in
training/setup.py, what a run holds in training/run.py, and how its weights are saved in
training/saving.py.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phitune.config import Config, dump_config
from phitune.data.batching import epoch_batches, should_group, split_micro_padded
from phitune.data.dataset import statistics_of
from phitune.errors import PhituneError
from phitune.generate import complete_batch
from phitune.models import HEADS, load_tokenizer, num_virtual_tokens
from phitune.tasks import model_head, score, scoring
from phitune.training import allocator, hyperparameters
from phitune.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from phitune.training.distributed import Runtime, peak_memory_mb, run_deepspeed_config, start
from phitune.training.engines import Engine
from phitune.training.hyperparameters import chosen
from phitune.training.objectives import Objective, add_sums, build_objective, evaluate
from phitune.training.progress import Progress
from phitune.training.run import Run, RunResult, StepResult
from phitune.training.runcard import write_run_card
from phitune.training.saving import save_adapter, save_final
from phitune.training.setup import (
    check_best_metric,
    compile_for_run,
    load_data,
    prepare_output_dir,
    resolve_precision,
    save_initial_adapter,
    scores_answers,
    seed_everything,
    setup_engine,
    setup_model,
    total_steps,
)
from phitune.training.tracking import MetricsLog, Startup

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from transformers import PreTrainedTokenizerBase

    from phitune.tasks import TaskSpec

log = logging.getLogger("phitune")


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run (or resume) the fine-tuning described by `cfg`, in this process and any others started
    with it (torchrun, `phitune train --nproc N`, accelerate launch, deepspeed)."""
    run = setup(cfg, resume=resume, overwrite=overwrite)
    fit(run)
    return finish(run)


# --- setup -------------------------------------------------------------------------------------


def read_data(cfg: Config, runtime, out: Path):
    """(the config with `auto` hyperparameters chosen, tokenizer, data, what auto chose); the
    output dir gets config.yaml (which keeps `auto`) and task.json."""
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg, tokenizer)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        (out / "task.json").write_text(data.spec.to_json())
    cfg, chosen = hyperparameters.for_run(cfg, data, runtime.world)  # run.json records the choice
    if chosen:
        log.info("auto: %s (%s)", ", ".join(f"{k} {v:g}" for k, v in chosen.items() if k != "why"), chosen["why"])
    return cfg, tokenizer, data, chosen


def run_objective(cfg: Config, data, tokenizer, engine, reference) -> Objective:
    """The loss the run trains (SFT, classification, DPO against `reference`), over its batches."""
    return build_objective(
        data.spec,
        tokenizer.pad_token_id,
        objective=cfg.method.objective,
        virtual=num_virtual_tokens(engine.unwrap()),
        beta=cfg.method.beta,
        reference=reference,
    )


def setup(cfg: Config, *, resume: bool, overwrite: bool) -> Run:
    startup = Startup()
    out = Path(cfg.output_dir)
    precision = resolve_precision(cfg)
    accelerator, runtime = start(cfg, precision)
    resume_from = prepare_output_dir(cfg, resume=resume, overwrite=overwrite, is_main=runtime.is_main)
    runtime.barrier()
    startup.lap("accelerator_and_output_dir")

    # Data first: a bad file fails in seconds, before the model is loaded.
    cfg, tokenizer, data, chosen = read_data(cfg, runtime, out)
    startup.lap("tokenizer_and_data")

    seed_everything(cfg.training.seed)  # the same initial weights in every process
    head, labels = model_head(data.spec)
    ds_config, zero3_loading = run_deepspeed_config(cfg, runtime)  # the second must live as long as the model
    model, reference, weights = setup_model(cfg, accelerator, runtime, precision, tokenizer, head, labels)
    startup.lap("model")
    steps = total_steps(cfg, len(data.train_examples))
    weights["compiled"] = compile_for_run(cfg, model, runtime, precision, accelerator.device, steps, data)
    engine, scheduler = setup_engine(cfg, model, accelerator, runtime, precision, ds_config, steps)
    objective = run_objective(cfg, data, tokenizer, engine, reference)
    answers_scored = scores_answers(cfg, data)
    best_metric = check_best_metric(cfg, data, objective, answers_scored)

    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, engine, scheduler, runtime)
        log.info("resumed from %s (step %d)", resume_from, state.step)
    elif runtime.parallel:
        torch.manual_seed(cfg.training.seed + runtime.rank)  # dropout differs between processes, as their examples do
    initial = save_initial_adapter(cfg, engine, runtime, out)
    startup.lap("engine_and_resume")
    return Run(
        cfg=cfg,
        out=out,
        accelerator=accelerator,
        runtime=runtime,
        tokenizer=tokenizer,
        data=data,
        chosen=chosen,
        engine=engine,
        scheduler=scheduler,
        objective=objective,
        steps=steps,
        answers_scored=answers_scored,
        best_metric=best_metric,
        state=state,
        resumed=resume_from is not None,
        weights=weights,
        initial=initial,
        zero3_loading=zero3_loading,
        startup=startup,
    )


# --- the loop ----------------------------------------------------------------------------------


def fit(run: Run) -> None:
    t, state, examples_all = run.cfg.training, run.state, run.data.train_examples
    lengths = [len(e.input_ids) for e in examples_all]
    batch_size = chosen(t.batch_size, "batch_size")
    group = should_group(lengths, batch_size, t.seed, run.cfg.data.group_by_length)
    if run.runtime.is_main:
        run.metrics = MetricsLog(run.out, tensorboard=t.tensorboard, resume_step=state.step if run.resumed else None)
        run.progress = Progress(total=run.steps, start=state.step)
    run.engine.model.train()
    started = time.perf_counter() - state.elapsed_s
    try:
        while state.step < run.steps:
            batches = epoch_batches(lengths, batch_size, t.seed, state.epoch, group)
            while state.batch_index < len(batches) and state.step < run.steps:
                step_start = time.perf_counter()
                examples = [examples_all[i] for i in batches[state.batch_index]]
                lr = float(run.scheduler.get_last_lr()[0])
                step = train_step(run, examples)
                run.startup.reached("first_step_done")
                tps = step.real_tokens / max(time.perf_counter() - step_start, 1e-9)
                state.elapsed_s = time.perf_counter() - started
                after_step(
                    run, step, lr=lr, tokens_per_second=tps, epoch=state.epoch + state.batch_index / len(batches)
                )
            if state.batch_index >= len(batches):
                state.epoch, state.batch_index = state.epoch + 1, 0
    finally:
        if run.progress:
            run.progress.close()
        if run.metrics:
            run.metrics.close()


def train_step(run: Run, examples: list) -> StepResult:
    """One optimizer step on the step batch `examples` (this process takes its share, in
    micro-batches); the state moves on. Returns the step's loss, sums and token counts."""
    t, runtime, engine, state = run.cfg.training, run.runtime, run.engine, run.state
    # Every process knows the whole step batch, so the global count needs no message.
    step_tokens = run.objective.count(examples)
    real_tokens = sum(getattr(e, "num_tokens", None) or len(e.input_ids) for e in examples)  # pairs: both replies
    loss_sum, sums = 0.0, dict[str, float]()
    for part in split_micro_padded(runtime.shard(examples), t.gradient_accumulation_steps):
        # A process short of examples (the last batch of an epoch) still runs a forward and
        # backward, weighted zero: collectives need every process.
        weight = 1.0 if part else 0.0
        with run.accelerator.autocast():
            loss, part_sums = engine.forward(run.objective.loss, part or examples[:1], run.accelerator.device)
        # Divide by the whole step's trained tokens (examples, pairs) over all processes and
        # multiply by their number (gradients are averaged over processes): every token weighs
        # the same, however the batch is split.
        engine.backward(loss * (weight * runtime.world / step_tokens))
        loss_sum += weight * float(loss.detach())
        add_sums(sums, {k: weight * v for k, v in part_sums.items()})
    grad_norm = engine.step(t.max_grad_norm)
    run.scheduler.step()
    (loss_sum,), sums = runtime.sum_over_processes(sums, loss_sum)
    state.step += 1
    state.batch_index += 1
    state.tokens_seen += real_tokens
    state.trained_tokens += step_tokens
    run.last_loss = loss_sum / step_tokens
    if not math.isfinite(run.last_loss):
        raise PhituneError(
            f"training diverged at step {state.step} (loss {run.last_loss}); lower training.learning_rate "
            f"(now {t.learning_rate}) or use precision fp32/bf16"
        )
    return StepResult(run.last_loss, sums, step_tokens, real_tokens, grad_norm)


def after_step(run: Run, step: StepResult, *, lr: float, tokens_per_second: float, epoch: float) -> None:
    """Log, evaluate (keeping the best, stopping early), report progress and checkpoint, each
    when the config says this step is due."""
    t, state = run.cfg.training, run.state
    last = state.step == run.steps
    record = None
    if state.step % t.log_every == 0 or last:
        record = _step_record(run, step, lr=lr, tokens_per_second=tokens_per_second, epoch=epoch)
    stop_early = False
    if run.data.validation_examples and t.eval_every and (state.step % t.eval_every == 0 or last):
        stop_early = evaluate_and_keep_best(run)
        record = (record or {"step": state.step}) | {f"eval_{k}": v for k, v in (run.eval_metrics or {}).items()}
    if record and run.metrics:
        run.metrics.write(record)
    if run.progress:
        run.progress.update(state.step, step.loss, lr, tokens_per_second, record)
    if t.save_every and state.step % t.save_every == 0:
        save_checkpoint(
            run.out / "checkpoints",
            run.engine,
            run.scheduler,
            state,
            run.runtime,
            save_adapter=(lambda path: save_adapter(run, path)) if run.cfg.is_adapter else None,
            keep=t.save_total_limit,
        )
        run.startup.reached("first_checkpoint_written")
    if stop_early:
        log.info(
            "early stopping at step %d: eval %s did not improve for %d evaluations (best %.4f at step %d)",
            state.step,
            run.best_metric,
            t.early_stopping_patience,
            state.best_value,
            state.best_step,
        )
        run.steps = state.step


def _step_record(run: Run, step: StepResult, *, lr: float, tokens_per_second: float, epoch: float) -> dict:
    """The metrics.jsonl line of a logged step."""
    state = run.state
    record = {
        "step": state.step,
        "epoch": epoch,
        "loss": step.loss,
        "lr": lr,
        "grad_norm": step.grad_norm,
        "tokens_per_second": tokens_per_second,
        **run.objective.metrics(step.sums, step.step_tokens),
        "trained_tokens": state.trained_tokens,
        "tokens_seen": state.tokens_seen,
        "elapsed_s": round(state.elapsed_s, 3),
        "time": round(time.time(), 3),
    }
    if torch.cuda.is_available():
        record["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


# --- evaluation --------------------------------------------------------------------------------


def evaluate_and_keep_best(run: Run) -> bool:
    """Evaluate now (run.eval_metrics), write OUT/best when it improved and training.keep_best asks;
    whether early stopping's patience ran out."""
    t, state = run.cfg.training, run.state
    run.eval_metrics = evaluate_now(run)
    improved = update_best(state, run.eval_metrics, run.best_metric)
    if improved and t.keep_best:
        save_final(run, name="best")
        if run.runtime.is_main:
            (run.out / "best" / "best.json").write_text(
                json.dumps({"step": state.step, "metric": run.best_metric, "value": state.best_value}) + "\n"
            )
    patience = t.early_stopping_patience or 0
    return bool(patience) and state.evals_without_improvement >= patience


def evaluate_now(run: Run) -> dict:
    t = run.cfg.training
    batch_size = chosen(t.batch_size, "batch_size")
    values = evaluate(
        run.objective,
        run.engine.model,
        run.data.validation_examples or [],
        batch_size=batch_size,
        device=run.accelerator.device,
        autocast=run.accelerator.autocast,
        runtime=run.runtime,
        forward=run.engine.forward,
    )
    if run.answers_scored:
        values |= generated_metrics(
            run.engine,
            run.tokenizer,
            run.data.spec,
            (run.data.validation_samples or [])[: t.eval_generate],
            run.runtime,
            batch_size=batch_size,
            autocast=run.accelerator.autocast,
        )
    return values


def update_best(state: TrainState, values: dict, metric: str) -> bool:
    """Record this evaluation against the best so far; True when it is the new best."""
    value = values[metric]
    better = (
        (value < state.best_value if metric in scoring.LOWER_IS_BETTER else value > state.best_value)
        if state.best_value is not None
        else True
    )
    if better:
        state.best_value, state.best_step, state.evals_without_improvement = value, state.step, 0
    else:
        state.evals_without_improvement += 1
    return better


def generated_metrics(
    engine: Engine,
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    samples: list,
    runtime: Runtime,
    *,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager],
) -> dict:
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
        answers = engine.forward(
            complete_batch,
            tokenizer,
            [prompts[i] for i in padded],
            batch_size,
            scoring.answer_budget(tokenizer, references),
            runtime.parallel and engine.sharded,
        )
    model.train(was_training)
    by_index: dict[int, str] = {}
    for part in runtime.gather(list(zip(mine, answers[: len(mine)]))):
        by_index.update(part)
    return scoring.headline(score(spec, [by_index[i] for i in range(len(asked))], references))


# --- finish ------------------------------------------------------------------------------------


def finish(run: Run) -> RunResult:
    """The last evaluation when none ran at the end, the final weights, run.json and the run card."""
    if run.data.validation_examples and run.eval_metrics is None:
        run.eval_metrics = evaluate_now(run)
    artifact = save_final(run)
    summary = run_summary(run, artifact)
    if run.runtime.is_main:
        (run.out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_run_card(run.out, run.cfg, summary)
    run.runtime.barrier()
    return RunResult(run.out, run.state, run.last_loss, run.eval_metrics, artifact)


def run_summary(run: Run, artifact: Path) -> dict:
    """What run.json says of a finished run."""
    cfg, data, state, t = run.cfg, run.data, run.state, run.cfg.training
    head, labels = model_head(data.spec)
    return {
        "steps": state.step,
        "epochs_completed": state.epoch,
        "trained_tokens": state.trained_tokens,
        "tokens_seen": state.tokens_seen,
        "train_examples": data.num_train_examples,
        "truncated_examples": data.train.truncated,
        "dropped_examples": len(data.train.dropped),
        "duplicates_removed": data.train.duplicates if cfg.data.dedupe else 0,
        "packed_sequences": len(data.train_examples) if data.packed else None,
        "data": statistics_of(data.train, data.spec),
        "task": data.spec.name,
        "objective": run.objective.name,
        "hyperparameters": {
            "epochs": t.epochs,
            "batch_size": t.batch_size,
            "learning_rate": t.learning_rate,
            "max_steps": t.max_steps,
            "auto": run.chosen,
        },
        "model_class": HEADS[head],
        "num_labels": len(labels) if labels else None,
        "processes": run.runtime.world,
        "strategy": run.runtime.strategy,
        "allocator": allocator.in_use(),
        "peak_memory_per_process": run.runtime.gather(peak_memory_mb()),
        **run.weights,
        "final_train_loss": run.last_loss,
        "eval": run.eval_metrics,
        "elapsed_s": round(state.elapsed_s, 2),
        "startup_s": run.startup.seconds,
        "best": {
            "metric": run.best_metric,
            "value": state.best_value,
            "step": state.best_step,
            "saved": str(run.out / "best") if t.keep_best and state.best_step else None,
        },
        "leakage": data.leakage.as_dict() if data.leakage else None,
        "artifact": str(artifact),
    }
