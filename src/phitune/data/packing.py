"""Packing with isolation: several examples in one sequence, none seeing another.

A packed sequence carries `position_ids` that restart at 0 for each example. With no 2-D
attention mask, transformers (>= 4.54, `masking_utils.find_packed_sequence_indices`) turns those
restarts into a block-diagonal causal mask for eager, sdpa and flash attention alike, so an
example's logits are the same packed or alone (tests/data/test_packing.py checks exactly that). Only
without a KV cache: call the model with `use_cache=False` (training does), or the restarts are
ignored and examples see each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from phitune.data.chat import IGNORE_INDEX, Example


@dataclass
class PackedExample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    source: str  # the first example's source, then "+N"

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _packed(parts: list[Example]) -> PackedExample:
    ids, labels, pos = [], [], []
    for e in parts:
        ids += e.input_ids
        # The loss shifts by one along the row: the previous example's last position would learn
        # to predict this example's first token. Nothing predicts a segment's first token.
        labels += [IGNORE_INDEX] + e.labels[1:]
        pos += list(range(len(e.input_ids)))
    source = parts[0].source + (f" +{len(parts) - 1}" if len(parts) > 1 else "")
    return PackedExample(ids, labels, pos, source)


def pack_whole(examples: list[Example], max_length: int) -> list[PackedExample]:
    """First-fit decreasing: examples are never split (chat, prompt/completion)."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(e)
                room[b] -= n
                break
        else:
            bins.append([e])
            room.append(max_length - n)
    return [_packed(b) for b in bins]


def pack_stream(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Raw text: documents laid end to end and cut into full sequences. A document cut at a
    sequence boundary continues in the next one as a new segment (positions from 0)."""
    out, current, free = [], [], max_length
    for e in examples:
        ids, labels = e.input_ids, e.labels
        while ids:
            take = min(free, len(ids))
            current.append(Example(ids[:take], labels[:take], e.source))
            ids, labels, free = ids[take:], labels[take:], free - take
            if free == 0:
                out.append(_packed(current))
                current, free = [], max_length
    if current:
        out.append(_packed(current))
    return out
