"""A GGUF file written tensor by tensor: the writer, and each tensor converted to its stored type
as it is written (f32 vectors; f32, f16, bf16 or q8_0 matrices by the `gguf` package)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any


def new_writer(path: Path, arch: str):
    """A GGUF writer for `arch` (a gguf.MODEL_ARCH member name)."""
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    return gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])


def write_tensors(writer, tensors: list, qtype) -> None:
    """Header, metadata, tensor table, then each tensor converted as it is written (streamed:
    one converted tensor in memory at a time). Vectors (norms, biases) stay f32 as llama.cpp keeps them."""
    import gguf
    import numpy as np

    plain: dict[Any, np.dtype] = {
        gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
        gguf.GGMLQuantizationType.F16: np.dtype(np.float16),
    }
    todo = []
    for name, shape, value in tensors:
        kind = _tensor_type(shape, qtype)
        if kind in plain:
            writer.add_tensor_info(name, shape, plain[kind], math.prod(shape) * plain[kind].itemsize)
        else:
            stored = gguf.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(name, stored, np.dtype(np.uint8), math.prod(stored), raw_dtype=kind)
        todo.append((value, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for value, kind in todo:
        array = np.ascontiguousarray(value(), dtype=plain.get(kind, np.float32))
        writer.write_tensor_data(array if kind in plain else gguf.quants.quantize(array, kind))
    writer.close()


def _tensor_type(shape: tuple, qtype):
    import gguf

    if len(shape) < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:  # rows that do not fill whole blocks (tiny test models): kept in f16
        return gguf.GGMLQuantizationType.F16
    return qtype
