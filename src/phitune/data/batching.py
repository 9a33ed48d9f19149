"""Batches for an epoch: random, or length-grouped where random batches would mostly compute
padding. Grouping costs quality when it is not needed (batches of alike lengths are less
representative: measured on the real-model benchmark, docs/concepts/training.md, "Packing and length grouping"), so
`auto` groups only when random batches would pad past PAD_LIMIT. The order
is a pure function of (lengths, seed, epoch), so a resumed run sees exactly the batches the
interrupted one would have seen."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from phitune.data.chat import IGNORE_INDEX, Example
from phitune.data.packing import PackedExample

MEGA_BATCHES = 50  # batches sorted together; larger groups pad less but shuffle less
PAD_LIMIT = 0.2  # auto: group when random batches would spend more than this fraction of tokens on padding


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0


def should_group(lengths: list[int], batch_size: int, seed: int, mode: str = "auto") -> bool:
    """on / off as asked; auto: whether random batches of these lengths would pad past PAD_LIMIT."""
    if mode != "auto":
        return mode == "on"
    return padding_fraction(lengths, epoch_batches(lengths, batch_size, seed, 0, group=False)) > PAD_LIMIT


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: bool = True) -> list[list[int]]:
    """Shuffle; with `group`, sort by length inside mega-batches, cut into batches and shuffle the
    batches. The longest batch goes first so an out-of-memory error shows at step 1, not hours later.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group_size = batch_size * MEGA_BATCHES if group else batch_size
    batches: list[list[int]] = []
    for g in range(0, len(order), group_size):
        chunk = sorted(order[g : g + group_size], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    if not batches:
        return batches
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    first = batches.pop(longest)
    rng.shuffle(batches)
    return [first] + batches


def split_micro(batch: list, parts: int) -> list[list]:
    size = -(-len(batch) // parts)
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def split_micro_padded(examples: list, parts: int) -> list[list]:
    """`parts` micro-batches, empty ones included, so every process runs as many as the others."""
    micro = split_micro(examples, parts) if examples else []
    return micro + [[] for _ in range(parts - len(micro))]


def collate(examples: Sequence[Example | PackedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of this micro-batch only.

    Packed examples carry position ids instead of an attention mask (transformers builds the
    block-diagonal mask from the restarts); the padding is one more segment, never labelled.
    """
    width = max(len(e.input_ids) for e in examples)
    packed = getattr(examples[0], "position_ids", None) is not None
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.arange(width).repeat(len(examples), 1)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        if isinstance(e, PackedExample):
            positions[row, :n] = torch.tensor(e.position_ids)
            positions[row, n:] = torch.arange(width - n)
    if packed:
        return {"input_ids": ids, "position_ids": positions, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
