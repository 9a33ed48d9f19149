"""LoRA adapters as the engine applies them: per target layer, A and B with the scale folded in.

Read from a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`, never a
pickle), or taken from a PeftModel in memory (eval after training). LoRA (rsLoRA and per-layer
ranks included) and DoRA batch with other adapters; IA3, prompt tuning and adapters that replace
whole modules are refused here with the reason, and their callers fall back to PEFT.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from phitune.errors import PhituneError


class NotBatchable(PhituneError):
    """An adapter the engine cannot apply (its kind, not its file): serve it through PEFT instead."""


@dataclass
class LoraWeights:
    """One layer's update, kept in fp32 whatever the base's dtype: on a CPU a bf16 matmul this
    small costs several times an fp32 one (oneDNN's per-call overhead), and fp32 keeps the small
    update from being rounded away before it is added."""

    at: torch.Tensor  # [in, r]: A transposed
    bt: torch.Tensor  # [r, out]: B transposed, scale folded in
    magnitude: torch.Tensor | None = None  # DoRA: m / ||W + s B A|| per output, fp32

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.at) @ self.bt

    @property
    def rank(self) -> int:
        return self.at.shape[1]


@dataclass(eq=False)  # compared and hashed by identity: one loaded adapter is one object
class LoraSet:
    name: str
    layers: dict[str, LoraWeights]

    @property
    def dora(self) -> bool:
        return any(w.magnitude is not None for w in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(w.at.nbytes + w.bt.nbytes for w in self.layers.values())


def read_adapter(path: str | Path, targets: dict[str, torch.nn.Module]) -> LoraSet:
    """The LoRA adapter saved in directory `path`, checked against the base's layers `targets`
    (name -> linear layer): a layer it names that the base lacks, or of other shapes, means it was
    trained on another base."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise PhituneError(f"{path}: no adapter_model.safetensors (the adapter's weights are missing)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PhituneError(f"{config_file}: unreadable adapter config ({exc})") from None
    _check_kind(config, path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own (SafetensorError) and OS errors
        raise PhituneError(f"{weights_file}: not a readable safetensors file ({exc})") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    parts = {"A.weight": "A", "B.weight": "B", "magnitude_vector": "m", "magnitude_vector.weight": "m"}
    for key, tensor in tensors.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in parts:
            raise NotBatchable(f"{path}: tensor {key} is not a LoRA A/B matrix (modules_to_save or another kind)")
        layers.setdefault(name, {})[parts[part]] = tensor
    out = {}
    for name, pair in layers.items():
        if not {"A", "B"} <= set(pair) or ("m" in pair) != bool(config.get("use_dora")):
            raise PhituneError(
                f"{weights_file}: layer {name} has {sorted(pair)} of the lora A, B (and DoRA m) it needs"
            )
        scale = _scale(config, name, pair["A"].shape[0])
        out[name] = _weights(pair["A"], pair["B"], scale, targets, name, path, pair.get("m"))
    if not out:
        raise PhituneError(f"{weights_file}: no LoRA weights in it")
    return LoraSet(str(path), out)


def _check_kind(config: dict, path: Path) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise NotBatchable(
            f"{path}: its {kind} adapter cannot be batched (the engine runs LoRA and DoRA); "
            "merge it (phitune merge) and serve the merged model"
        )
    if config.get("modules_to_save") or config.get("lora_bias"):
        raise NotBatchable(f"{path}: the adapter also replaces modules (modules_to_save or lora_bias)")


def _scale(config: dict, name: str, r: int) -> float:
    from peft.utils.other import get_pattern_key

    alphas: dict[str, float] = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(alphas), name) if alphas else None
    alpha = alphas[key] if key is not None and key in alphas else None
    alpha = config.get("lora_alpha", 8) if alpha is None else alpha
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _weights(a, b, scale, targets, name, path, magnitude=None) -> LoraWeights:
    layer = targets.get(name)
    if layer is None:
        raise PhituneError(
            f"{path}: the adapter targets layer {name}, which this base model does not have: "
            "it was trained on another base model"
        )
    if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
        raise PhituneError(
            f"{path}: layer {name} is {layer.in_features}->{layer.out_features} in this base model but "
            f"{a.shape[1]}->{b.shape[0]} in the adapter: it was trained on another base model"
        )
    return pair(a, b, scale, layer, magnitude, f"{path}: layer {name}")


def pair(a, b, scale: float, layer=None, magnitude=None, where: str = "") -> LoraWeights:
    """A layer's update; with DoRA's magnitude, its per-output scale m / ||W + s B A|| (the norm
    of each output's row, as PEFT computes it), from the base layer's own weight."""
    weights = LoraWeights(a.detach().float().T.contiguous(), (b.detach().float() * scale).T.contiguous())
    if magnitude is not None:
        base = getattr(layer, "weight", None)
        if type(layer) is not torch.nn.Linear or base is None:
            raise NotBatchable(f"{where}: DoRA on a quantized base layer (the engine needs its plain weight)")
        merged = base.detach().float() + weights.bt.T @ weights.at.T
        weights.magnitude = magnitude.detach().float().flatten() / torch.linalg.norm(merged, dim=1)
    return weights


def from_peft(model: torch.nn.Module) -> LoraSet | None:
    """The active LoRA adapter of a PeftModel in memory (None: no adapter is active, or it is
    merged into the base weights already)."""
    from peft.tuners.lora import LoraLayer

    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    active = getattr(model, "active_adapter", None)
    active = active if isinstance(active, str) else ""
    config = peft_config.get(active)
    if config is None or getattr(config, "peft_type", None) is None or config.peft_type.value != "LORA":
        raise NotBatchable(f"a {getattr(config, 'peft_type', '?')} adapter (the engine runs LoRA and DoRA)")
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or active not in module.lora_A:
            continue
        if module.merged or module.disable_adapters:
            continue
        a, b = module.lora_A[active].weight, module.lora_B[active].weight
        dora = module.lora_magnitude_vector[active].weight if active in module.lora_magnitude_vector else None
        short = name.removeprefix("base_model.model.")
        layers[short] = pair(a, b, module.scaling[active], module.get_base_layer(), dora, f"layer {short}")
    return LoraSet(f"in-memory:{active}", layers) if layers else None
