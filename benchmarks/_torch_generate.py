"""PyTorch's side of the runtime benchmarks: one prompt's processing and a forced-length greedy
generation with transformers' `generate`, timed apart."""

from __future__ import annotations

import time


def prefill_and_decode(model, ids: list[int], new: int) -> tuple[float, float]:
    """(seconds for one forward over the prompt, seconds for the `new` tokens after it): generate()
    processes the prompt again, so the prompt's time is taken off its total."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=x, use_cache=True)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            use_cache=True,
            pad_token_id=model.config.pad_token_id,
        )
        total = time.perf_counter() - start
    return prefill, total - prefill
