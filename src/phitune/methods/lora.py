"""LoRA and its variants: DoRA (weight-decomposed) and QLoRA (LoRA over a 4-bit base). Plain LoRA
runs each adapted layer as one fused step (`fused_lora.py`) unless `fused: false`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from phitune.methods.base import BuildContext, Method, TargetedSettings, attach
from phitune.methods.targets import resolve_target_modules

if TYPE_CHECKING:
    from torch import nn

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


class LoraFamilySettings(TargetedSettings):
    """The keys LoRA, DoRA and QLoRA share."""

    r: int = Field(16, gt=0, description="LoRA/DoRA/QLoRA rank.")
    alpha: float = Field(
        32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha / sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description="LoRA weight initialisation.")


class LoraSettings(LoraFamilySettings):
    name: Literal["lora"] = Field("lora", description="Fine-tuning method.")
    fused: bool = Field(
        True,
        description="LoRA: each adapted layer computed as one fused step (the update accumulated into the base "
        "matmul; same numbers, less memory traffic); false runs PEFT's own layer. Not used by DoRA or QLoRA.",
    )


class DoraSettings(LoraFamilySettings):
    name: Literal["dora"] = Field("dora", description="Fine-tuning method.")


class QLoraSettings(LoraFamilySettings):
    name: Literal["qlora"] = Field("qlora", description="Fine-tuning method.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA 4-bit data type.")
    double_quant: bool = Field(True, description="QLoRA: quantise the quantisation constants too.")
    compute_dtype: DtypeName = Field(
        "auto", description="QLoRA matmul dtype; auto: bfloat16 where supported, else float16/float32."
    )


def build(model: nn.Module, settings: Any, context: BuildContext) -> nn.Module:
    from peft import LoraConfig

    peft_cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        task_type=context.task_type,
        target_modules=resolve_target_modules(model, settings.target_modules),
        modules_to_save=settings.modules_to_save,
        use_rslora=settings.use_rslora,
        use_dora=settings.name == "dora",
        init_lora_weights=True if settings.init == "default" else settings.init,
    )
    if getattr(settings, "fused", False):  # QLoRA's 4-bit layers are bitsandbytes' own; DoRA is a PEFT variant
        import phitune.methods.fused_lora as fused_lora

        fused_lora.register(peft_cfg)
    return attach(model, peft_cfg)


def build_qlora(model: nn.Module, settings: Any, context: BuildContext) -> nn.Module:
    import torch

    from phitune.methods.quantization import resolve_compute_dtype

    if resolve_compute_dtype(settings) == torch.float16:
        # fp16 norms and head overflow; PEFT's preparation upcasts every non-quantized weight to
        # fp32 for that. With bf16 or fp32 compute it only costs memory (embeddings and head
        # in fp32 are ~5% of a Phi-3's weights, more than its whole 4-bit body on small models).
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return build(model, settings, context)


def _four_bit_base(settings: Any, device: Any) -> dict:
    from phitune.methods.quantization import qlora_quantization

    options: dict = {"quantization_config": qlora_quantization(settings)}
    if device.type == "cuda":
        options["device_map"] = {"": device.index or 0}
    return options


def _exact_4bit(model: Any) -> None:
    from phitune.methods.quantization import exact_4bit_inference

    exact_4bit_inference(model)  # evaluations during training: the numbers training computes


def _record_base(adapter_dir: Any, settings: Any) -> None:
    from phitune.methods.quantization import write_base_quantization

    write_base_quantization(adapter_dir, settings)


LORA = Method("lora", LoraSettings, build)
DORA = Method("dora", DoraSettings, build)
QLORA = Method(
    "qlora",
    QLoraSettings,
    build_qlora,
    limits={
        "fsdp": "qlora under fsdp is not supported (4-bit weights are not sharded here); use ddp or deepspeed",
        "zero3": "qlora with ZeRO-3 is not supported (4-bit weights cannot be sharded here); "
        "use zero_stage 2 or strategy ddp",
        "compile": "4-bit layers",
    },
    load_options=_four_bit_base,
    after_load=_exact_4bit,
    save_extras=_record_base,
)
