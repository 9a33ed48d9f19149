"""Causal-LM loss on trained positions only.

The output head runs on the hidden states of positions that carry a label, never on padding or
prompt tokens, so the full (batch x length x vocab) logits tensor is never built. The loss is a
*sum*; the recipe divides by the number of trained tokens of the whole optimizer step, so
gradient accumulation and uneven micro-batches weigh every token the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phitune.data.chat import IGNORE_INDEX


def _causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper (with adapters injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model reads: ids with an attention mask (padded) or position ids (packed)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def labelled_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], virtual_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 logits of the positions that predict a label, their targets, their row index)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    lm = _causal_lm(model)
    decoder, head = lm.get_decoder() if hasattr(lm, "get_decoder") else None, lm.get_output_embeddings()
    # Prompt learning prepends virtual tokens inside PEFT's forward, and some architectures scale
    # or soft-cap logits after the head: those go through the model's own forward.
    post_head = any(getattr(lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if virtual_tokens or decoder is None or head is None or post_head:
        logits = model(**model_inputs(batch), use_cache=False).logits
        logits = logits[:, virtual_tokens:][:, :-1][keep]
    else:
        hidden = decoder(**model_inputs(batch), use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    return logits.float(), targets[keep], rows


def token_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], virtual_tokens: int = 0
) -> tuple[torch.Tensor, int, int]:
    """(sum of token cross-entropies, number of trained tokens, number predicted correctly)."""
    logits, target, _ = labelled_logits(model, batch, virtual_tokens)
    loss = F.cross_entropy(logits, target, reduction="sum")
    with torch.no_grad():
        correct = int((logits.argmax(-1) == target).sum())
    return loss, int(target.numel()), correct


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probabilities of each row's trained tokens (DPO's log pi(y|x))."""
    logits, target, rows = labelled_logits(model, batch)
    token_logps = -F.cross_entropy(logits, target, reduction="none")
    return torch.zeros(batch["labels"].shape[0], device=logits.device).index_add(0, rows, token_logps)
