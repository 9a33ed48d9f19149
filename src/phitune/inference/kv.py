"""The engine's key/value cache: fixed-size blocks of token slots under a memory budget.

A sequence holds a list of blocks (its block table); token `p` of it lives in slot
`table[p // BLOCK] * BLOCK + p % BLOCK` of every layer's pool. A sequence is admitted only when
the blocks for its prompt and its longest reply are free, so a running sequence never waits for
memory and nothing is preempted; a request that must wait, waits in the queue.
"""

from __future__ import annotations

import torch

BLOCK = 16


class KVPool:
    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, budget_bytes: int) -> None:
        per_token = self.token_bytes(layers, kv_heads, head_dim, dtype)
        self.blocks = max(1, budget_bytes // (per_token * BLOCK))
        self.bytes_per_token = per_token
        self.shape, self.layers, self.dtype = (self.blocks * BLOCK, kv_heads, head_dim), layers, dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.free = list(range(self.blocks - 1, -1, -1))

    @staticmethod
    def token_bytes(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """What one token's keys and values take in every layer."""
        return layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def allocate(self) -> None:
        """The tensors, made by the thread that will use them (see `Runner.prepare`). Left
        uninitialised, so the OS maps pages as blocks are first used (an idle budget costs no
        memory); `take` zeroes a block before a sequence gets it, since a masked key's value still
        meets a zero weight in attention, and garbage could be NaN."""
        if not self.keys:
            self.keys = [torch.empty(self.shape, dtype=self.dtype) for _ in range(self.layers)]
            self.values = [torch.empty(self.shape, dtype=self.dtype) for _ in range(self.layers)]

    @property
    def capacity_tokens(self) -> int:
        return self.blocks * BLOCK

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    @staticmethod
    def blocks_for(tokens: int) -> int:
        return -(-tokens // BLOCK)

    def can_hold(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self.free)

    def take(self, tokens: int) -> list[int]:
        n = self.blocks_for(tokens)
        if n > len(self.free):
            raise RuntimeError("KV pool exhausted: admission should have waited")
        taken, self.free = self.free[-n:], self.free[:-n]
        fresh = slots(taken, 0, n * BLOCK)
        for pool in (*self.keys, *self.values):
            pool.index_fill_(0, fresh, 0)
        return taken

    def give_back(self, table: list[int]) -> None:
        self.free.extend(table)
        table.clear()

    @property
    def used_fraction(self) -> float:
        return 1 - len(self.free) / self.blocks


def slots(table: list[int], start: int, end: int) -> torch.Tensor:
    """The pool slots of positions start..end-1 of a sequence with block table `table`."""
    p = torch.arange(start, end)
    return torch.tensor(table, dtype=torch.long)[p // BLOCK] * BLOCK + p % BLOCK
