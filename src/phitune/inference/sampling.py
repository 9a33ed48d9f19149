"""The next token of each sequence from its logits: greedy, or sampled with its own seeded
generator (so a seeded request gives the same tokens whatever else is in the batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def generator(self) -> torch.Generator | None:
        if self.temperature <= 0:
            return None
        return torch.Generator().manual_seed(self.seed % 2**64)


def next_tokens(logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` [S, vocab] (fp32)."""
    out = logits.argmax(dim=-1).tolist()  # greedy rows, all at once
    for i, (s, g) in enumerate(zip(settings, generators)):
        if s.temperature > 0 and g is not None:  # a sampling row has its generator
            out[i] = _sample(logits[i], s, g)
    return out


def _sample(row: torch.Tensor, s: Sampling, g: torch.Generator) -> int:
    probs = torch.softmax(row / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p (always at least the top token).
        keep = (sorted_probs.cumsum(0) - sorted_probs) < s.top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=g)])
    return int(torch.multinomial(probs, 1, generator=g))
