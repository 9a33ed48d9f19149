"""A transformers causal LM as llama.cpp reads it: the GGUF architecture, its hyperparameter keys
and its tensors (names from the `gguf` package's own map, layouts as llama.cpp expects them).

llama.cpp's `convert_hf_to_gguf.py` is the reference; this covers the architectures phitune's
inference engine runs (llama, mistral, qwen2, phi3) so that an export needs no llama.cpp checkout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from phitune.errors import PhituneError

if TYPE_CHECKING:
    import numpy as np
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class GgufArch:
    name: str  # gguf.MODEL_ARCH member
    # llama.cpp's llama graph rotates interleaved pairs (the original Meta layout); transformers'
    # Llama/Mistral rotate halves, so their q and k rows are reordered on the way out.
    interleave_qk: bool = False


ARCHITECTURES = {
    "llama": GgufArch("LLAMA", interleave_qk=True),
    "mistral": GgufArch("LLAMA", interleave_qk=True),
    "qwen2": GgufArch("QWEN2"),
    "phi3": GgufArch("PHI3"),
}


def gguf_arch(config: PretrainedConfig, where: str) -> GgufArch:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise PhituneError(
            f"{where}: a {config.model_type!r} model; GGUF export covers {', '.join(sorted(ARCHITECTURES))} "
            "(export it with `phitune export onnx`, or serve it with `phitune serve`)"
        )
    return arch


def rope_parameters(config: PretrainedConfig) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer, config: PretrainedConfig, arch: GgufArch, where: str) -> None:
    """The `{arch}.*` keys llama.cpp reads to build the graph."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    dim = head_dim(config)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rotary = int(dim * float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))))
    writer.add_rope_dimension_count(rotary)
    if arch.name == "PHI3":
        # llama.cpp tells Phi-3 (a window) from Phi-4-mini (none) by a zero window.
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    _add_rope_scaling(writer, config, rope, where)


def _add_rope_scaling(writer, config: PretrainedConfig, rope: dict, where: str) -> None:
    import gguf

    kind = rope["rope_type"]
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3":
        pass  # carried by the rope_freqs tensor (rope_tensors)
    elif kind in ("longrope", "su") and config.model_type == "phi3":
        original = int(rope.get("original_max_position_embeddings") or config.original_max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        )
    else:
        raise PhituneError(
            f"{where}: rope scaling {kind!r} has no GGUF form phitune writes (it writes linear, yarn, llama3, "
            "and longrope for phi3)"
        )


def rope_tensors(config: PretrainedConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Extra tensors llama.cpp reads for scaled rotary embeddings."""
    import numpy as np

    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_factors(rope, head_dim(config))
    elif rope["rope_type"] in ("longrope", "su") and rope.get("long_factor"):
        yield "rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32)


def _llama3_factors(rope: dict, dim: int):
    """Llama 3.1's frequency-dependent scaling as the divisor of each rotary frequency."""
    import numpy as np

    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, between))
    return divisor.astype(np.float32)


def interleave_rows(weight, heads: int):
    """Rows of each head from [first halves, second halves] to pairs, as llama.cpp's rope reads them."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class TensorNames:
    """transformers parameter names -> GGUF tensor names, by the `gguf` package's own table."""

    def __init__(self, config: PretrainedConfig, arch: GgufArch):
        import gguf

        self.arch = arch
        self.config = config
        self.map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name), config.num_hidden_layers)

    def gguf_name(self, name: str) -> str:
        name = name.removeprefix("base_model.model.")
        found = self.map.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise PhituneError(f"{name}: llama.cpp has no tensor for this {self.config.model_type} weight")
        return found

    def reorder(self, name: str, value):
        """`value` (a weight or bias of `name`, rows first) as llama.cpp lays it out."""
        if not self.arch.interleave_qk:
            return value
        if ".q_proj." in name:
            return interleave_rows(value, self.config.num_attention_heads)
        if ".k_proj." in name:
            return interleave_rows(value, self.config.num_key_value_heads)
        return value


def model_tensors(model, config: PretrainedConfig, arch: GgufArch) -> list[tuple[str, tuple, Callable]]:
    """(GGUF name, shape, a function giving the float32 array) for every weight of `model`, the
    tied output head left out (llama.cpp reads the embeddings for it). The arrays are made one at
    a time as the file is written, so an export holds one converted tensor, not a copy of all."""
    names = TensorNames(config, arch)
    state = model.state_dict()
    embed = state.get("model.embed_tokens.weight")
    out: list[tuple[str, tuple, Callable]] = []
    for name, tensor in state.items():
        if name == "lm_head.weight" and embed is not None and getattr(config, "tie_word_embeddings", False):
            if tensor.data_ptr() == embed.data_ptr() or tensor.equal(embed):
                continue
        if name.endswith("rotary_emb.inv_freq"):
            continue

        def value(name=name, tensor=tensor):
            return names.reorder(name, tensor.detach().float().cpu().numpy())

        out.append((names.gguf_name(name), tuple(tensor.shape), value))
    for name, array in rope_tensors(config):

        def constant(array: np.ndarray = array) -> np.ndarray:
            return array

        out.append((name, array.shape, constant))
    return out
