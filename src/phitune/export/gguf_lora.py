"""A PEFT LoRA adapter as a GGUF LoRA (llama.cpp's `--lora`, Ollama's ADAPTER).

llama.cpp scales an adapter by alpha / rank with one alpha for the whole file; PEFT's scale can
differ per layer (alpha_pattern, rank_pattern, rsLoRA). So each layer's scale is folded into
its B here and the file's alpha is 0, which llama.cpp reads as "scale 1": every layer comes out
exactly as PEFT scaled it.
"""

from __future__ import annotations

import json
from pathlib import Path

from phitune.errors import PhituneError


def _refuse(adapter: str, why: str) -> PhituneError:
    return PhituneError(f"{adapter}: {why}; export it merged instead (drop --lora)")


def adapter_layers(adapter: str, config) -> dict:
    """layer name -> (A [r, in], B [out, r] with the scale folded in), checked against the base's shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    from phitune.inference.lora import NotBatchable, read_adapter

    settings = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if settings.get("peft_type") != "LORA":
        raise _refuse(adapter, f"a {settings.get('peft_type')} adapter; llama.cpp's adapters are LoRA")
    if settings.get("use_dora"):
        raise _refuse(adapter, "a DoRA adapter; llama.cpp applies plain LoRA (the magnitude would be lost)")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    targets: dict[str, torch.nn.Module] = {n: m for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    try:
        lora = read_adapter(adapter, targets)
    except NotBatchable as exc:
        raise _refuse(adapter, f"it holds more than LoRA matrices ({exc})") from None
    if "lm_head" in lora.layers and getattr(config, "tie_word_embeddings", False):
        raise _refuse(adapter, "its LoRA on lm_head changes the output head the base shares with its embeddings")
    return {name: (w.at.T.contiguous(), w.bt.T.contiguous()) for name, w in lora.layers.items()}


def write_lora(adapter: str, config, path: Path, name: str) -> None:
    import gguf

    from phitune.export.gguf_file import new_writer, write_tensors
    from phitune.export.gguf_model import TensorNames, gguf_arch

    arch = gguf_arch(config, adapter)
    names = TensorNames(config, arch)
    tensors = []
    for layer, (a, b) in sorted(adapter_layers(adapter, config).items()):
        target = names.gguf_name(layer + ".weight")
        a_value, b_value = a.numpy(), names.reorder(layer + ".weight", b.numpy())
        tensors.append((target + ".lora_a", tuple(a.shape), lambda v=a_value: v))
        tensors.append((target + ".lora_b", tuple(b.shape), lambda v=b_value: v))
    writer = new_writer(path, arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # the scales are in B (see above)
    write_tensors(writer, tensors, gguf.GGMLQuantizationType.F32)
