"""The LoRA updates of one step, whatever adapter each row has.

Per layer, the adapters in the batch are stacked: A of every adapter one above the other
([sum of ranks, in]), B side by side ([out, sum of ranks]). Then every row goes through two
matmuls, whatever the number of adapters: h = x A^T, masked so each row keeps its own adapter's
columns (zero for the base's rows), and y += h B^T. Computing a row against the other adapters'
columns costs rows x (sum of ranks) x (in + out) multiply-adds, which is small beside the base
layer while the sum of ranks stays below half the layer's width; past that, each adapter's rows
get their own two matmuls. The stacks are built when the set of adapters in the batch changes
(sequences join and leave far less often than steps run) and kept for the next steps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from phitune.inference.lora import LoraSet


@dataclass
class _Stacked:
    at: torch.Tensor  # [in, R], fp32
    bt: torch.Tensor  # [R, out], fp32
    ranks: tuple[int, ...]  # per adapter of the batch (0: it does not adapt this layer)


class Stacks:
    """Stacked weights per set of adapters, the last few sets kept."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.sets: OrderedDict[tuple[int, ...], tuple[tuple, dict]] = OrderedDict()

    def for_adapters(self, adapters: tuple[LoraSet, ...]) -> dict:
        key = tuple(map(id, adapters))
        if key in self.sets:
            self.sets.move_to_end(key)
            return self.sets[key][1]
        layers: dict = {}
        self.sets[key] = (adapters, layers)  # holding the adapters keeps their ids from being reused
        while len(self.sets) > self.keep:
            self.sets.popitem(last=False)
        return layers


class MultiLora:
    def __init__(self, groups: list[tuple[LoraSet | None, int, int]], rows: int, stacks: Stacks) -> None:
        self.groups = [(lora, start, end) for lora, start, end in groups if lora is not None]
        self.adapters = tuple(dict.fromkeys(lora for lora, _, _ in self.groups))
        self.index = {id(lora): i for i, lora in enumerate(self.adapters)}
        self.rows = rows
        self.everywhere = len(self.groups) == 1 and self.groups[0][1:] == (0, rows)  # one adapter, every row
        self.layers = stacks.for_adapters(self.adapters) if self.adapters else {}
        self.masks: dict[tuple, torch.Tensor] = {}
        self.dora = [
            (lora, start, end) for lora, start, end in self.groups if lora.dora
        ]  # by ranks, or by the names of layers sharing an input

    def __bool__(self) -> bool:
        return bool(self.groups)

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """y += each row's LoRA update of layer `name` (x, y: every row of the step); then DoRA's
        rows are rescaled (`bias`: the base layer's, which DoRA leaves unscaled)."""
        self._add(name, x, y)
        if self.dora:
            self._rescale(name, y, bias)

    def _add(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if name not in self.layers:
            self.layers[name] = self._stack(name, x.shape[-1])
        stacked = self.layers[name]
        if stacked is None:
            return
        if stacked is False:  # too many ranks to stack: each adapter's rows on their own
            for lora, start, end in self.groups:
                weights = lora.layers.get(name)
                if weights is not None:
                    y[start:end] += weights.delta(x[start:end])
            return
        h = x.float() @ stacked.at
        if not self.everywhere or len(stacked.ranks) > 1:
            h *= self._mask(stacked.ranks)
        if y.dtype == torch.float32:
            y.addmm_(h, stacked.bt)
        else:
            y += h @ stacked.bt

    def add_shared(self, names: list[str], x: torch.Tensor, ys: list[torch.Tensor], biases: list) -> None:
        """The same for several layers of one input: one A matmul for all of them."""
        key = tuple(names)
        if key not in self.layers:
            self.layers[key] = self._join(names, x.shape[-1])
        joined = self.layers[key]
        if joined is None:
            return
        if joined is False:
            for name, y, bias in zip(names, ys, biases):
                self.add(name, x, y, bias)
            return
        at, parts = joined
        h = x.float() @ at
        if not self.everywhere or len(self.adapters) > 1:
            h *= self._joined_mask(key, parts)
        for i, start, stacked in parts:
            width = sum(stacked.ranks)
            if ys[i].dtype == torch.float32:
                ys[i].addmm_(h[:, start : start + width], stacked.bt)
            else:
                ys[i] += h[:, start : start + width] @ stacked.bt
        if self.dora:
            for name, y, bias in zip(names, ys, biases):
                self._rescale(name, y, bias)

    def _rescale(self, name: str, y: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None = None) -> None:
        """DoRA: y = bias + m / ||W + s B A|| * (W x + s B A x) on its adapter's rows."""
        for lora, start, end in self.dora:
            weights = lora.layers.get(name)
            if weights is None or weights.magnitude is None:
                continue
            picked = slice(start, end) if rows is None else ((rows >= start) & (rows < end)).nonzero().flatten()
            part = y[picked].float()
            if bias is not None:
                part = (part - bias.float()) * weights.magnitude + bias.float()
            else:
                part = part * weights.magnitude
            y[picked] = part.to(y.dtype)

    def _join(self, names: list[str], width: int):
        """The layers' stacks side by side (None: no adapter has any of them; False: one is too
        wide to stack)."""
        stacks = []
        for name in names:
            if name not in self.layers:
                self.layers[name] = self._stack(name, width)
            stacks.append(self.layers[name])
        if any(s is False for s in stacks):
            return False
        parts, start = [], 0
        for i, stacked in enumerate(stacks):
            if stacked is not None:
                parts.append((i, start, stacked))
                start += sum(stacked.ranks)
        if not parts:
            return None
        return torch.cat([p.at for _, _, p in parts], dim=1).contiguous(), parts

    def _joined_mask(self, key: tuple, parts) -> torch.Tensor:
        mask = self.masks.get(key)
        if mask is None:
            mask = self.masks[key] = torch.cat([self._mask(p.ranks) for _, _, p in parts], dim=1)
        return mask

    def add_rows(self, name: str, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, bias=None) -> None:
        """The same for a subset of the step's rows (`rows`: their indices; the output head)."""
        for lora, start, end in self.groups:
            weights = lora.layers.get(name)
            if weights is None:
                continue
            picked = ((rows >= start) & (rows < end)).nonzero().flatten()
            if len(picked):
                y[picked] += weights.delta(x[picked])
        if self.dora:
            self._rescale(name, y, bias, rows)

    def _stack(self, name: str, width: int):
        parts = [lora.layers.get(name) for lora in self.adapters]
        if all(p is None for p in parts):
            return None
        ranks = tuple(0 if p is None else p.rank for p in parts)
        if sum(ranks) > width // 2:
            return False
        real = [p for p in parts if p is not None]
        return _Stacked(torch.cat([p.at for p in real], dim=1).contiguous(), torch.cat([p.bt for p in real]), ranks)

    def _mask(self, ranks: tuple[int, ...]) -> torch.Tensor:
        mask = self.masks.get(ranks)
        if mask is None:
            offsets = [sum(ranks[:i]) for i in range(len(ranks))]
            mask = torch.zeros(self.rows, sum(ranks))
            for lora, start, end in self.groups:
                k = self.index[id(lora)]
                mask[start:end, offsets[k] : offsets[k] + ranks[k]] = 1
            self.masks[ranks] = mask
        return mask
