"""What a method is: its own strict settings (the `method:` section when `name` names it), how it
attaches to a model, and what it cannot be combined with.

Nothing here or in a method module imports torch, PEFT or transformers at import time: the config
(and so the service's API process) reads these settings, and only training builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from torch import nn


class MethodSettings(BaseModel):
    """The keys every method reads; each method's settings add their own (and refuse the others')."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str  # each method's settings narrow it to their own name (the union's tag)
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: next-token loss on the trained tokens; dpo: preference loss on preference pairs against "
        "a frozen reference (adapters: the base with the adapter disabled; full: a frozen copy).",
    )
    beta: float = Field(
        0.1, gt=0, description="dpo: strength of the pull towards the reference (higher = stay closer)."
    )


class TargetedSettings(MethodSettings):
    """The keys of a method that adapts chosen layers (LoRA and its variants, IA3)."""

    target_modules: Union[str, list[str]] = Field(
        "all-linear",
        description="Module names (suffixes) to adapt, or 'all-linear' (every linear layer except the "
        "output head; finds Phi-3's fused qkv_proj and gate_up_proj); [all-linear, lm_head] adds the head.",
    )
    modules_to_save: Optional[list[str]] = Field(
        None, description="Extra modules trained in full and saved with the adapter."
    )


@dataclass(frozen=True)
class BuildContext:
    """What attaching a method needs besides the model and its settings."""

    task_type: str  # PEFT's: CAUSAL_LM, SEQ_CLS (a sequence head) or TOKEN_CLS (a token head)
    tokenizer_path: str  # prompt tuning initialises its virtual tokens from text


Builder = Callable[["nn.Module", Any, BuildContext], "nn.Module"]


@dataclass(frozen=True)
class Method:
    name: str
    settings: type[MethodSettings]
    build: Builder  # attach the method to a loaded model (imports torch / peft when called)
    is_adapter: bool = True  # trains an adapter over a frozen base (else every weight)
    lr_scale: float = 1.0  # its auto learning rate relative to LoRA's
    # What it cannot be combined with: fsdp, deepspeed, zero3, compile, dpo, head, dpo_zero3 ->
    # the one-line reason the config check shows.
    limits: dict[str, str] = field(default_factory=dict)
    # from_pretrained options of the base it trains on (a 4-bit base for QLoRA), and what to fix
    # on the loaded model; what to save beside its adapter.
    load_options: Callable[[Any, Any], dict] | None = None
    after_load: Callable[[Any], None] | None = None
    save_extras: Callable[[Any, Any], None] | None = None


def attach(model: nn.Module, peft_cfg: Any) -> nn.Module:
    """PEFT's get_peft_model, its refusal turned into one line naming the method section."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_cfg)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise PhituneError(
            f"method: peft could not apply {type(peft_cfg).__name__} to this model: {str(exc).splitlines()[0]}"
        ) from exc
