"""What this machine computes natively."""

from __future__ import annotations

import os

import torch


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls at ~2x fp32 speed. Elsewhere bf16 is emulated and slower."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch
        return False


def usable_cpus() -> int:
    """The cores this process may run on (its affinity where the OS says), for native thread pools."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
