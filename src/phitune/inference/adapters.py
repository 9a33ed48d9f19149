"""The adapters in memory: loaded on first use, bounded by count and bytes, least recently used
out first, never one that a running sequence uses (pinned). A deleted model is forgotten at once,
or as soon as its last sequence ends."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from phitune.inference.lora import LoraSet
    from phitune.inference.metrics import Metrics


@dataclass
class _Entry:
    lora: LoraSet
    pins: int = 0
    forgotten: bool = False


class Full(Exception):
    """Every cached adapter is in use and the cache is at its bound: the request waits."""


class AdapterCache:
    def __init__(self, load: Callable[[str], LoraSet], *, max_count: int, max_bytes: int, metrics: Metrics) -> None:
        self.load, self.max_count, self.max_bytes, self.metrics = load, max_count, max_bytes, metrics
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest use first

    @property
    def nbytes(self) -> int:
        return sum(e.lora.nbytes for e in self.entries.values())

    def pin(self, key: str) -> LoraSet:
        """The adapter at `key`, loaded if need be, held until `unpin`. Raises Full when it is not
        loaded and nothing can make room; a load error (PhituneError) is the caller's request's."""
        entry = self.entries.get(key)
        if entry is not None and not entry.forgotten:
            self.metrics.count("adapter_cache_hits")
            self.entries.move_to_end(key)
        else:
            if len(self.entries) >= self.max_count and not self._evictable():
                raise Full
            started = time.perf_counter()
            lora = self.load(key)
            self.metrics.observe("adapter_load_seconds", time.perf_counter() - started)
            self.metrics.count("adapter_cache_misses")
            entry = self.entries[key] = _Entry(lora)
            self._shrink()
        entry.pins += 1
        return entry.lora

    def unpin(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        entry.pins -= 1
        if entry.pins == 0 and entry.forgotten:
            del self.entries[key]
        self._shrink()

    def forget(self, prefix: str) -> None:
        """Drop every adapter under `prefix` (a deleted model's directory)."""
        for key, entry in list(self.entries.items()):
            if key == prefix or key.startswith(prefix.rstrip("/") + "/"):
                if entry.pins:
                    entry.forgotten = True
                else:
                    del self.entries[key]

    def _evictable(self) -> bool:
        return any(e.pins == 0 for e in self.entries.values())

    def _shrink(self) -> None:
        """Evict the least recently used unpinned adapters until within both bounds."""
        for key in list(self.entries):
            if len(self.entries) <= self.max_count and self.nbytes <= self.max_bytes:
                return
            if self.entries[key].pins == 0:
                del self.entries[key]
                self.metrics.count("adapter_cache_evictions")
