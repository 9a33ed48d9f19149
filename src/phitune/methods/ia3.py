"""IA3: learned vectors that rescale the keys, values and feed-forward activations (PEFT's IA3Config)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from phitune.methods.base import BuildContext, Method, TargetedSettings, attach
from phitune.methods.targets import resolve_target_modules

if TYPE_CHECKING:
    from torch import nn

# Output projections of the MLP: IA3 scales their *input* (the feed-forward activations).
FEEDFORWARD_OUT = ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h")


class IA3Settings(TargetedSettings):
    name: Literal["ia3"] = Field("ia3", description="Fine-tuning method.")


def build(model: nn.Module, settings: Any, context: BuildContext) -> nn.Module:
    from peft import IA3Config

    targets = resolve_target_modules(model, settings.target_modules)
    peft_cfg = IA3Config(
        task_type=context.task_type,
        target_modules=targets,
        feedforward_modules=[t for t in targets if t in FEEDFORWARD_OUT],
        modules_to_save=settings.modules_to_save,
    )
    return attach(model, peft_cfg)


METHOD = Method("ia3", IA3Settings, build, lr_scale=3.0)
