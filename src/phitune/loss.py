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


def token_loss(model, batch: dict[str, torch.Tensor], virtual_tokens: int = 0) -> tuple[torch.Tensor, int, int]:
    """(sum of token cross-entropies, number of trained tokens, number predicted correctly)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    lm = _causal_lm(model)
    decoder, head = lm.get_decoder() if hasattr(lm, "get_decoder") else None, lm.get_output_embeddings()
    # Prompt learning prepends virtual tokens inside PEFT's forward, and some architectures scale
    # or soft-cap logits after the head: those go through the model's own forward.
    post_head = any(getattr(lm.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if virtual_tokens or decoder is None or head is None or post_head:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[:, virtual_tokens:][:, :-1][keep]
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    logits = logits.float()
    target = targets[keep]
    loss = F.cross_entropy(logits, target, reduction="sum")
    with torch.no_grad():
        correct = int((logits.argmax(-1) == target).sum())
    return loss, int(target.numel()), correct
