"""Prompt tuning: learned virtual tokens prepended to every input (PEFT's PromptTuningConfig)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import Field

from phitune.methods.base import BuildContext, Method, MethodSettings, attach

if TYPE_CHECKING:
    from torch import nn


class PromptTuningSettings(MethodSettings):
    name: Literal["prompt_tuning"] = Field("prompt_tuning", description="Fine-tuning method.")
    num_virtual_tokens: int = Field(20, gt=0, description="prompt_tuning: number of learned virtual tokens.")
    prompt_init_text: Optional[str] = Field(
        None, description="prompt_tuning: initialise virtual tokens from this text."
    )


def build(model: nn.Module, settings: Any, context: BuildContext) -> nn.Module:
    from peft import PromptTuningConfig, PromptTuningInit

    text = settings.prompt_init_text
    peft_cfg = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=settings.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=context.tokenizer_path,
    )
    return attach(model, peft_cfg)


METHOD = Method(
    "prompt_tuning",
    PromptTuningSettings,
    build,
    lr_scale=10.0,
    limits={
        "fsdp": "prompt_tuning under fsdp is not supported (virtual tokens are not sharded here); use ddp or deepspeed",
        "deepspeed": "prompt_tuning under deepspeed is not supported; use ddp",
        "dpo": "dpo with prompt_tuning is not supported; use lora, dora, qlora, ia3 or full",
        "head": "prompt_tuning cannot train a classification head; use lora",
    },
)
