"""torch.compile of the decoder layers for training (`training.compile`).

Between its matmuls a decoder layer runs a few dozen small operators (RMSNorm, rotary embedding,
SwiGLU, residual adds, the casts of mixed precision), each reading and writing whole activations:
on a CPU in bf16 they take more of a step than the matmuls do. Inductor fuses them into a few
loops. Each decoder layer is compiled on its own (`nn.Module.compile`), with dynamic shapes since
batches differ in length; the layers run the same code, so one graph serves them all (their
parameters are the graph's inputs).

Compiling is slow on a small CPU (its cost is measured in docs/benchmarks/speed-and-memory.md).
Inductor's FX-graph and AOTAutograd caches keep the result in ~/.cache/phitune/compile (or
$TORCHINDUCTOR_CACHE_DIR), so a later run of the same model on the same machine pays part of it
(Dynamo still traces in every process). `auto` compiles only on a CPU in bf16 (in float32
compiling gained nothing measurable) and when the run is long enough to repay a cold compile:
`REPAYS` in (decoder parameters) x (tokens per step) x (steps), from the measured break-even
(benchmarks/results/compile_probe_*.md, and docs/benchmarks/speed-and-memory.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("phitune")

REPAYS = 2e13  # parameter-tokens: the break-even measured on a 2-core AMX Xeon, with margin


def decoder_layers(model: Any) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers (under a PEFT wrapper too), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def why_compile(
    setting: str | bool,
    model: torch.nn.Module,
    *,
    device: torch.device,
    precision: str,
    unsupported: str | None,
    param_tokens: float,
    processes: int = 1,
) -> str | None:
    """Why this run compiles its layers, or None. `unsupported`: what in the run rules it out
    (checkpointing, 4-bit layers, sharded weights); `param_tokens`: decoder parameters x tokens
    the run trains on. `auto` leaves runs of several processes (DDP) eager: not measured there."""
    if setting is False or unsupported is not None or decoder_layers(model) is None:
        return None
    if setting is True:
        return "training.compile: true"
    if device.type != "cpu" or precision != "bf16" or processes > 1:
        return None
    if param_tokens < REPAYS:
        return None
    return f"auto: {param_tokens:.1e} parameter-tokens repay the compile time (from {REPAYS:.0e})"


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place; how many. The compiled code is cached on disk."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default (a temporary directory) into the variable once it has looked.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "phitune" / "compile")
    layers = decoder_layers(model) or torch.nn.ModuleList()
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def decoder_parameters(model: torch.nn.Module) -> int:
    """Parameters inside the decoder layers (the matmuls' weights; embeddings and head left out)."""
    layers = decoder_layers(model)
    return sum(p.numel() for p in layers.parameters()) if layers is not None else 0
