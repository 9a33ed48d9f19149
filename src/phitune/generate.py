"""Greedy (or sampled) chat completion with a base model, an adapter, or a training output."""

from __future__ import annotations

import torch


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """eos plus the chat template's end-of-turn token(s), so generation stops after one reply."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    out.add(tokenizer.eos_token_id)
    for tok in ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tok in tokenizer.get_vocab():
            out.add(tid)
    return sorted(i for i in out if i is not None)


@torch.no_grad()
def chat_complete(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 64, temperature: float = 0.0,
                  seed: int = 0) -> str:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=end_of_turn_ids(model, tokenizer),
                  pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
