"""Loss, perplexity and mean token accuracy on held-out chat examples (trained positions only)."""

from __future__ import annotations

import contextlib
import math

import torch

from phitune.data.batching import collate
from phitune.data.chat import Example
from phitune.loss import token_loss


@torch.no_grad()
def lm_metrics(model, examples: list[Example], *, batch_size: int, pad_id: int, device,
               autocast=contextlib.nullcontext, virtual_tokens: int = 0) -> dict[str, float]:
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss, n, c = token_loss(model, batch, virtual_tokens)
        total, count, correct = total + float(loss), count + n, correct + c
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "mean_token_accuracy": correct / max(count, 1)}
