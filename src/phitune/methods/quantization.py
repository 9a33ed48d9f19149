"""The 4-bit base of QLoRA: how it is quantised (bitsandbytes NF4 / FP4), recorded beside the
adapter (base_quantization.json) so that inference loads the same base, and run as training ran."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from phitune.errors import PhituneError
from phitune.hardware import cuda_bf16

if TYPE_CHECKING:
    from torch import nn
    from transformers import BitsAndBytesConfig

log = logging.getLogger("phitune")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FourBit(Protocol):
    """QLoRA's settings (methods/lora.QLoraSettings) as the quantisation reads them."""

    quant_type: str
    double_quant: bool
    compute_dtype: str


def resolve_compute_dtype(method_cfg: FourBit) -> torch.dtype:
    if method_cfg.compute_dtype != "auto":
        return DTYPES[method_cfg.compute_dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if cuda_bf16() else torch.float16
    return torch.float32


def qlora_quantization(method: FourBit) -> BitsAndBytesConfig:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise PhituneError(
            "method qlora needs bitsandbytes: pip install 'phitune[qlora]' (or pip install bitsandbytes)"
        ) from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(method),
    )


BASE_QUANTIZATION = "base_quantization.json"  # beside a QLoRA adapter: the 4-bit base it was trained on


def write_base_quantization(adapter_dir: Path, method: FourBit) -> None:
    (Path(adapter_dir) / BASE_QUANTIZATION).write_text(
        json.dumps(
            {
                "quant_type": method.quant_type,
                "double_quant": method.double_quant,
                "compute_dtype": str(resolve_compute_dtype(method)).removeprefix("torch."),
            },
            indent=2,
        )
        + "\n"
    )


def trained_quantization(adapter: str | None) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig of the base a QLoRA adapter was trained on, or None. The adapter
    learned to correct that 4-bit base: on the unquantised weights it answers differently."""
    spec = Path(adapter) / BASE_QUANTIZATION if adapter else None
    if spec is None or not spec.is_file():
        return None
    q = json.loads(spec.read_text())
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        log.warning(
            "%s was trained on a 4-bit base; without bitsandbytes it runs on the unquantised weights and "
            "answers differently (pip install 'phitune[qlora]')",
            adapter,
        )
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q["quant_type"],
        bnb_4bit_use_double_quant=q["double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]),
    )


def exact_4bit_inference(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weights on the first eval
    forward and computes in a bf16 kernel: numbers the adapter was never trained with (far off the
    merged model's), and weights that `dequantize_4bit` then misreads. Off: inference dequantizes
    in the run's compute dtype, as training did."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (bitsandbytes' attribute, not nn.Module's)
