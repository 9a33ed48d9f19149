"""Loss, perplexity and mean token accuracy on held-out chat examples (trained positions only)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from phitune.data.chat import Example

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch


def lm_metrics(
    model: Any,
    examples: list[Example],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    virtual_tokens: int = 0,
) -> dict[str, float]:
    from phitune.training.objectives import SFT, evaluate

    return evaluate(
        SFT(pad_id, virtual_tokens), model, examples, batch_size=batch_size, device=device, autocast=autocast
    )
