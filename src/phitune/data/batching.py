"""Length-grouped batches: little compute goes to padding, and the order is a pure function of
(seed, epoch), so a resumed run sees exactly the batches the interrupted one would have seen."""

from __future__ import annotations

import random

import torch

from phitune.data.chat import IGNORE_INDEX, Example

MEGA_BATCHES = 50  # batches sorted together; larger groups pad less but shuffle less


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, sort by length inside mega-batches, cut into batches, shuffle the batches.

    The longest batch goes first so an out-of-memory error shows at step 1, not hours later.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * MEGA_BATCHES
    batches: list[list[int]] = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g : g + group], key=lambda i: -lengths[i])
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


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
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
        if packed:
            positions[row, :n] = torch.tensor(e.position_ids)
            positions[row, n:] = torch.arange(width - n)
    if packed:
        return {"input_ids": ids, "position_ids": positions, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
