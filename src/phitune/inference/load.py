"""Loading a model for the engine, and the engine behind one-off generation (chat, generate, eval)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES = ("auto", "float32", "bfloat16")


def engine_dtype(name: str = "auto") -> torch.dtype:
    """bf16 where the CPU computes it natively (AVX-512 BF16, AMX); fp32 elsewhere, where bf16 is
    emulated and slower."""
    from phitune.hardware import cpu_has_native_bf16

    if name == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise PhituneError(f"--engine-dtype {name}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(
    base: str, *, trusted: bool = False, dtype: str = "auto"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A served base model (safetensors only, never a pickle) in the engine's dtype, on the CPU
    (where the engine runs, GPU or not)."""
    from phitune.models import load_for_inference

    return load_for_inference(
        base, safetensors_only=True, trust_remote_code=trusted, dtype=engine_dtype(dtype), device="cpu"
    )
