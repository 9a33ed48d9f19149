"""One safetensors file written tensor by tensor, as the tensors arrive.

A sharded model (ZeRO-3, FSDP2) is gathered one parameter at a time; `safetensors.save_file`
wants every tensor in memory at once, which made saving the largest memory peak of a sharded run.
The format allows streaming: an 8-byte little-endian header length, a JSON header with each
tensor's dtype, shape and byte range, then the raw bytes in that order
(https://github.com/huggingface/safetensors#format). The shapes are known before the gather, so
the header goes first and each tensor is written and dropped as soon as it is whole.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class Slot(NamedTuple):
    """What the header says of a tensor before its bytes exist."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def header(slots: list[Slot], metadata: dict[str, str]) -> bytes:
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for slot in slots:
        entries[slot.name] = {
            "dtype": DTYPES[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    return struct.pack("<Q", len(raw)) + raw


def write(path: Path, slots: list[Slot], tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """`tensors` must come in the order of `slots`, each with the promised shape and dtype; a
    mismatch stops the write (the caller's staging directory then keeps nothing)."""
    with open(path, "wb") as f:
        f.write(header(slots, metadata))
        for slot, (name, tensor) in zip(slots, tensors, strict=True):
            if (name, tuple(tensor.shape), tensor.dtype) != tuple(slot):
                raise ValueError(f"{path}: expected {slot}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def saved_as_is(model: Any, slots: list[Slot]) -> bool:
    """Whether transformers' save_pretrained would write these tensors under these names
    unchanged. A model loaded through a weight conversion (renamed or fused tensors) is saved
    with the conversion undone, which only transformers knows how to do; it is asked with
    shape-only (meta) tensors, and anything it renames, reshapes or fails on answers no."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # another transformers: let save_pretrained do it all
        return False
    probes = {s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in slots}
    try:
        back = revert_weight_conversion(model, dict(probes))
    except Exception:  # a converter that cannot run on meta tensors: not ours to second-guess
        return False
    return back.keys() == probes.keys() and all(back[k] is probes[k] for k in probes)
