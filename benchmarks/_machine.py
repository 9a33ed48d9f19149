"""The machine a benchmark ran on, for its results file."""

from __future__ import annotations

import os
from pathlib import Path


def cpu() -> str:
    """CPU model, the ISA flags that decide speed here (AVX2, AVX-512, BF16, AMX) and the core count."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f"))]
    return f"{model} ({' '.join(sorted(isa))}), {os.cpu_count()} cores"
