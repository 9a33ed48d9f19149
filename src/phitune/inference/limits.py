"""The engine's bounds, importable without torch (the API processes pass them on)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_batch: int = 32  # sequences in the running batch
    max_step_tokens: int = 256  # tokens one forward computes (decodes + prompt chunks)
    kv_cache_mb: int = 1024
    max_adapters: int = 8
    max_adapter_mb: int = 512
