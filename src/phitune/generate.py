"""Greedy (or sampled) chat completion with a base model, an adapter, or a training output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from phitune.inference.prompts import end_of_turn_ids, prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["complete_batch", "end_of_turn_ids", "greedy_ids", "prompt_ids"]


@torch.no_grad()
def complete_batch(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | list[dict]],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    synced: bool = False,
    *,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """One reply per prompt, `batch_size` at a time, stopping at the end-of-turn token; replies
    come back in input order. Through phitune's inference engine (continuous batching: a short
    reply's slot goes to the next prompt at once) when it runs the model; otherwise through
    transformers' generate with prompts left-padded and grouped by length. `synced`: the model is
    sharded over processes (ZeRO-3, FSDP), so each keeps running forwards until all have finished."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    if not synced and ids:
        from phitune.inference.local import generate_all

        answered = generate_all(
            model,
            tokenizer,
            ids,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            seed=seed,
        )
        if answered is not None:
            return answered
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=end_of_turn_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    if synced:
        kwargs["synced_gpus"] = True
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    replies: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, i in enumerate(rows):
            input_ids[r, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[r, width - len(ids[i]) :] = 1
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
        for r, i in enumerate(rows):
            replies[i] = str(tokenizer.decode(out[r, width:], skip_special_tokens=True)).strip()
    return replies


@torch.no_grad()
def greedy_ids(model: Any, tokenizer: PreTrainedTokenizerBase, ids: list[int], *, max_new_tokens: int) -> list[int]:
    """The greedy reply to prompt `ids` as token ids, without the end-of-turn token: the reference
    other runtimes (ONNX) are checked against."""
    stops = end_of_turn_ids(model, tokenizer)
    x = torch.tensor([ids], device=model.device)
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    return out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
