"""What a training step minimises: next-token loss, a classification head's loss, or DPO.

The recipe's loop is the same for all (accumulation, clipping, checkpoints, exact resume); an
objective says how to batch its examples, what the summed loss of a micro-batch is, what one
step's loss is divided by (`count`: trained tokens, labelled examples or pairs), and which
metrics its sums turn into. Losses are sums so that micro-batches of any size weigh the same.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

import torch
import torch.nn.functional as F

from phitune.data.batching import collate
from phitune.data.chat import IGNORE_INDEX
from phitune.tasks import model_head
from phitune.tasks.ner import bio_spans
from phitune.training.loss import sequence_logps, token_loss

if TYPE_CHECKING:
    from phitune.tasks import TaskSpec
    from phitune.training.distributed import Runtime


class Objective(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def eval_names(self) -> tuple[str, ...]:
        """What `evaluate` reports (training.best_metric may pick one)."""

    def count(self, examples: list) -> int:
        """What one step's summed loss is divided by: trained tokens, labelled examples or pairs."""

    def loss(self, model: torch.nn.Module, examples: list, device: torch.device) -> tuple[torch.Tensor, dict]:
        """The summed loss of a micro-batch, and sums its metrics are made from."""

    def metrics(self, sums: dict, count: int) -> dict: ...

    def eval_metrics(self, loss: float, sums: dict, count: int) -> dict: ...


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class SFT:
    pad_id: int
    virtual_tokens: int = 0
    name: str = "sft"
    head: str = "causal"
    eval_names = ("loss", "perplexity", "mean_token_accuracy")

    def count(self, examples: list) -> int:
        return sum(e.num_trained for e in examples)

    def loss(self, model: torch.nn.Module, examples: list, device: torch.device) -> tuple[torch.Tensor, dict]:
        loss, _, correct = token_loss(model, _to(collate(examples, self.pad_id), device), self.virtual_tokens)
        return loss, {"correct": correct}

    def metrics(self, sums: dict, count: int) -> dict:
        return {"mean_token_accuracy": sums.get("correct", 0) / max(count, 1)}

    def eval_metrics(self, loss: float, sums: dict, count: int) -> dict:
        return {"perplexity": math.exp(min(loss, 50.0))} | self.metrics(sums, count)


@dataclass
class SequenceClassification:
    """A head on the last token (transformers' *ForSequenceClassification finds it from pad_id)."""

    pad_id: int
    labels: list[str]
    name: str = "classification"
    head: str = "sequence"
    eval_names = ("loss", "accuracy", "macro_f1")

    def count(self, examples: list) -> int:
        return len(examples)

    def logits(self, model: torch.nn.Module, examples: list, device: torch.device) -> torch.Tensor:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(examples):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()

    def predict(self, model: torch.nn.Module, examples: list, device: torch.device) -> list[int]:
        """The predicted class of each example."""
        return self.logits(model, examples, device).argmax(-1).tolist()

    def loss(self, model: torch.nn.Module, examples: list, device: torch.device) -> tuple[torch.Tensor, dict]:
        target = torch.tensor([e.label for e in examples], device=device)
        logits = self.logits(model, examples, device)
        loss = F.cross_entropy(logits, target, reduction="sum")
        pred = logits.argmax(-1)
        k = len(self.labels)
        # Per-class true positives / predicted / actual, for macro F1 at evaluation.
        sums = {"correct": int((pred == target).sum())}
        for c in range(k):
            sums[f"tp{c}"] = int(((pred == c) & (target == c)).sum())
            sums[f"pred{c}"] = int((pred == c).sum())
            sums[f"gold{c}"] = int((target == c).sum())
        return loss, sums

    def metrics(self, sums: dict, count: int) -> dict:
        return {"accuracy": sums.get("correct", 0) / max(count, 1)}

    def eval_metrics(self, loss: float, sums: dict, count: int) -> dict:
        f1s = []
        for c in range(len(self.labels)):
            if sums.get(f"gold{c}", 0) == 0 and sums.get(f"pred{c}", 0) == 0:
                continue
            f1s.append(2 * sums[f"tp{c}"] / max(sums[f"pred{c}"] + sums[f"gold{c}"], 1))
        return self.metrics(sums, count) | {"macro_f1": sum(f1s) / max(len(f1s), 1)}


@dataclass
class TokenClassification:
    """A tag per word (its first token); entity F1 over exact (start, end, type) spans."""

    pad_id: int
    tags: list[str]
    name: str = "ner"
    head: str = "token"
    eval_names = ("loss", "accuracy", "entity_f1")

    def count(self, examples: list) -> int:
        return sum(e.num_trained for e in examples)

    def predict(self, model: torch.nn.Module, examples: list, device: torch.device) -> list[list[int]]:
        """The predicted tag of each labelled position (each word's first token), per example."""
        batch = _to(collate(examples, self.pad_id), device)
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        keep = batch["labels"] != IGNORE_INDEX
        return [pred[row][keep[row]].tolist() for row in range(len(examples))]

    def loss(self, model: torch.nn.Module, examples: list, device: torch.device) -> tuple[torch.Tensor, dict]:
        batch = _to(collate(examples, self.pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        keep = batch["labels"] != IGNORE_INDEX
        target = batch["labels"][keep]
        loss = F.cross_entropy(logits[keep], target, reduction="sum")
        pred = logits.argmax(-1)
        sums = {"correct": int((pred[keep] == target).sum()), "tp": 0, "pred": 0, "gold": 0}
        for row in range(len(examples)):
            k = keep[row]
            gold = bio_spans([self.tags[i] for i in batch["labels"][row][k].tolist()])
            guess = bio_spans([self.tags[i] for i in pred[row][k].tolist()])
            sums["tp"] += len(gold & guess)
            sums["pred"] += len(guess)
            sums["gold"] += len(gold)
        return loss, sums

    def metrics(self, sums: dict, count: int) -> dict:
        return {"accuracy": sums.get("correct", 0) / max(count, 1)}

    def eval_metrics(self, loss: float, sums: dict, count: int) -> dict:
        return self.metrics(sums, count) | {"entity_f1": 2 * sums["tp"] / max(sums["pred"] + sums["gold"], 1)}


@dataclass
class DPO:
    """Direct preference optimisation (Rafailov et al. 2023, the sigmoid loss).

    The reference is the frozen starting point: for adapters, the same model with the adapter
    switched off (no second copy in memory); for full fine-tuning, a frozen copy.
    """

    pad_id: int
    beta: float
    reference: Callable  # -> context manager in which `model` computes reference log-probs, or a model
    name: str = "dpo"
    head: str = "causal"
    eval_names = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

    def count(self, examples: list) -> int:
        return len(examples)

    def loss(self, model: torch.nn.Module, examples: list, device: torch.device) -> tuple[torch.Tensor, dict]:
        # One forward over chosen and rejected together: rows [0, n) chosen, [n, 2n) rejected.
        n = len(examples)
        batch = _to(collate([e.chosen for e in examples] + [e.rejected for e in examples], self.pad_id), device)
        policy = sequence_logps(model, batch)
        with torch.no_grad():
            ref_model, ctx = self.reference(model)
            with ctx:
                ref = sequence_logps(ref_model, batch)
        chosen = self.beta * (policy[:n] - ref[:n])
        rejected = self.beta * (policy[n:] - ref[n:])
        loss = -F.logsigmoid(chosen - rejected).sum()
        sums = {
            "reward_chosen": float(chosen.sum()),
            "reward_rejected": float(rejected.sum()),
            "correct": int((chosen > rejected).sum()),
        }
        return loss, sums

    def metrics(self, sums: dict, count: int) -> dict:
        c, r = sums.get("reward_chosen", 0.0) / max(count, 1), sums.get("reward_rejected", 0.0) / max(count, 1)
        return {
            "reward_chosen": c,
            "reward_rejected": r,
            "reward_margin": c - r,
            "reward_accuracy": sums.get("correct", 0) / max(count, 1),
        }

    def eval_metrics(self, loss: float, sums: dict, count: int) -> dict:
        return self.metrics(sums, count)


def adapter_disabled(model: Any) -> tuple[Any, ContextManager]:
    """Reference = the base under the adapter: PEFT's disable_adapter() context."""
    inner = model.module if hasattr(model, "module") and hasattr(model.module, "disable_adapter") else model
    return inner, inner.disable_adapter()


def frozen_copy(reference_model: torch.nn.Module) -> Callable:
    return lambda model: (reference_model, contextlib.nullcontext())


def add_sums(total: dict, part: dict) -> dict:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v
    return total


@torch.no_grad()
def evaluate(
    objective: Objective,
    model: torch.nn.Module,
    examples: list,
    *,
    batch_size: int,
    device: torch.device,
    autocast: Callable = contextlib.nullcontext,
    runtime: Runtime | None = None,
    forward: Callable | None = None,
) -> dict:
    """Loss and metrics over held-out examples (in length order: little padding). With several
    processes each takes every world-th batch and the sums are added up; a process without a batch
    in the last round runs a zero-weighted one (sharded models need every process in a forward).
    `forward(fn, *args)` runs `fn(model, *args)` (through the training engine when there is one)."""
    forward = forward or (lambda fn, *args: fn(model, *args))
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = (runtime.rank, runtime.world) if runtime else (0, 1)
    total, count, sums = 0.0, 0.0, dict[str, float]()
    for first in range(0, len(batches), world):
        mine = first + rank
        part = [examples[i] for i in batches[mine]] if mine < len(batches) else []
        weight = 1.0 if part else 0.0
        with autocast():
            loss, s = forward(objective.loss, part or examples[:1], device)
        total += weight * float(loss)
        count += objective.count(part) if part else 0
        add_sums(sums, {k: weight * v for k, v in s.items()})
    model.train(was_training)
    if runtime and runtime.parallel:
        (total, count), sums = runtime.sum_over_processes(sums, total, count)
    mean = total / max(count, 1)
    return {"loss": mean} | objective.eval_metrics(mean, sums, int(count))


def objective_kind(spec: TaskSpec, objective: str) -> str:
    """The `OBJECTIVES` key of a run: its head's kind (sequence | token), else method.objective."""
    head, _ = model_head(spec)
    return head if spec.head else objective


# kind -> (task spec, pad id, virtual tokens, DPO's beta, DPO's frozen reference or None) -> objective
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "sft": lambda spec, pad, virtual, beta, reference: SFT(pad, virtual),
    "dpo": lambda spec, pad, virtual, beta, reference: DPO(
        pad, beta, frozen_copy(reference) if reference is not None else adapter_disabled
    ),
    "sequence": lambda spec, pad, virtual, beta, reference: SequenceClassification(pad, spec.labels),
    "token": lambda spec, pad, virtual, beta, reference: TokenClassification(pad, model_head(spec)[1] or []),
}


def build_objective(
    spec: TaskSpec,
    pad_id: int,
    *,
    objective: str = "sft",
    virtual: int = 0,
    beta: float | None = None,
    reference: torch.nn.Module | None = None,
) -> Objective:
    """The objective for a task spec and method.objective (a head's spec gives the head's):
    `virtual` prompt-tuning tokens, DPO's `beta`, and `reference`, full fine-tuning's frozen copy
    of the start for DPO (adapters switch themselves off instead)."""
    return OBJECTIVES[objective_kind(spec, objective)](spec, pad_id, virtual, beta, reference)
