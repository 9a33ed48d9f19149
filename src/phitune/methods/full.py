"""Full fine-tuning: every weight trained (float32 master weights), no adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from phitune.methods.base import BuildContext, Method, MethodSettings

if TYPE_CHECKING:
    from torch import nn


class FullSettings(MethodSettings):
    name: Literal["full"] = Field("full", description="Fine-tuning method.")


def build(model: nn.Module, settings: Any, context: BuildContext) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


METHOD = Method(
    "full",
    FullSettings,
    build,
    is_adapter=False,
    lr_scale=0.1,
    limits={
        "dpo_zero3": "dpo with method full keeps a frozen reference copy, which ZeRO-3's sharded loading cannot "
        "give; use an adapter method, or zero_stage 2",
    },
)
