"""Which layers an adapter adapts: `method.target_modules` (suffixes, or 'all-linear') resolved
against a loaded model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from torch import nn

# The new, randomly initialised classification layers: trained in full, never given an adapter.
CLASSIFIER_NAMES = ("score", "classifier")


def _is_linear(module: nn.Module) -> bool:
    from torch import nn

    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, but check by name to not import it.
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_module_names(model: nn.Module) -> list[str]:
    """Suffixes of every linear layer except the output head (the 'all-linear' set)."""
    output_embeddings = getattr(model, "get_output_embeddings", None)  # transformers' models have it
    head = output_embeddings() if output_embeddings else None
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if _is_linear(mod) and mod is not head}
    return sorted(names - set(CLASSIFIER_NAMES))


def resolve_target_modules(model: nn.Module, target: str | list[str]) -> list[str]:
    available = linear_module_names(model)
    if target == "all-linear":
        if not available:
            raise PhituneError("method.target_modules: 'all-linear' found no linear layers in this model")
        return available
    wanted = [target] if isinstance(target, str) else list(target)
    if "all-linear" in wanted:  # e.g. [all-linear, lm_head]: every linear layer plus the named extras
        extras = [t for t in wanted if t != "all-linear"]
        return sorted(set(available) | set(resolve_target_modules(model, extras) if extras else ()))
    modules = {name.rsplit(".", 1)[-1]: mod for name, mod in model.named_modules()}
    unknown = [t for t in wanted if t not in modules]
    # Named explicitly, the output head may be adapted too (it is left out of 'all-linear' only).
    not_linear = [t for t in wanted if t in modules and not _is_linear(modules[t])]
    if unknown or not_linear:
        bad = ", ".join(unknown + not_linear)
        raise PhituneError(
            f"method.target_modules: {bad} {'is' if len(unknown + not_linear) == 1 else 'are'} not a linear layer of "
            "this model; "
            f"linear layers are: {', '.join(available)} (or use 'all-linear')"
        )
    return wanted
