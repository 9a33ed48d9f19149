"""`phitune create-model`: a small, UNTRAINED model of a real architecture, with a BPE tokenizer
trained here and the architecture's own chat template and special tokens.

No model hub is needed: this is the embedded default the demo and the tests fine-tune. The
weights are random; the model card and `config.json` (`phitune_untrained: true`) say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class Arch:
    config_class: str
    bos: str | None
    eos: str
    unk: str | None
    pad: str
    end_of_turn: str
    extra_special: tuple[str, ...]
    chat_template: str
    family: str


# Templates follow the published ones of each family (simplified where they only add tool calls).
_PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

ARCHS: dict[str, Arch] = {
    "phi3": Arch(
        "Phi3Config",
        "<s>",
        "<|endoftext|>",
        "<unk>",
        "<unk>",
        "<|end|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        _PHI3_TEMPLATE,
        "Phi-3 / Phi-3.5 / Phi-4-mini",
    ),
    "llama": Arch(
        "LlamaConfig",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        None,
        "<|finetune_right_pad_id|>",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        _LLAMA3_TEMPLATE,
        "Llama 3",
    ),
    "qwen2": Arch(
        "Qwen2Config",
        None,
        "<|im_end|>",
        None,
        "<|endoftext|>",
        "<|im_end|>",
        ("<|im_start|>",),
        _QWEN2_TEMPLATE,
        "Qwen2 / Qwen2.5",
    ),
    "mistral": Arch(
        "MistralConfig", "<s>", "</s>", "<unk>", "<unk>", "</s>", ("[INST]", "[/INST]"), _MISTRAL_TEMPLATE, "Mistral"
    ),
}

# Shapes shared by every architecture. `small` is ~30M parameters, `medium` ~300M.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        max_position_embeddings=2048,
        vocab=1024,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1536,
        max_position_embeddings=4096,
        vocab=8192,
    ),
    "medium": dict(
        hidden_size=1024,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=2816,
        max_position_embeddings=4096,
        vocab=16384,
    ),
}


def _special_tokens(arch: Arch) -> list[str]:
    seen: list[str] = []
    for tok in (arch.bos, arch.eos, arch.unk, arch.pad, arch.end_of_turn, *arch.extra_special):
        if tok and tok not in seen:
            seen.append(tok)
    return seen


def default_corpus() -> str:
    return resources.files("phitune").joinpath("assets/corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(arch: Arch, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _special_tokens(arch)
    tok = Tokenizer(models.BPE(unk_token=arch.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=arch.bos,
        eos_token=arch.eos,
        unk_token=arch.unk,
        pad_token=arch.pad,
        additional_special_tokens=[t for t in arch.extra_special if t not in (arch.eos, arch.pad)],
        chat_template=arch.chat_template,
        model_max_length=None,
        clean_up_tokenization_spaces=False,
    )


def create_model(
    output: str | Path,
    arch: str = "phi3",
    preset: str = "tiny",
    *,
    corpus: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "float32",
) -> dict:
    """Build and save the model + tokenizer; return a summary (path, parameters, vocab)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = _check_arguments(output, arch, preset, dtype, overwrite)
    spec, shape = ARCHS[arch], dict(PRESETS[preset])
    tokenizer = train_tokenizer(spec, _corpus_lines(corpus), shape.pop("vocab"))
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (("bos", spec.bos), ("eos", spec.eos), ("pad", spec.pad), ("eot", spec.end_of_turn))
        if tok
    }
    config = _model_config(arch, preset, shape, ids, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eos_ids = sorted({ids["eos"], ids["eot"]})
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get("bos"),
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=ids["pad"],
    )
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out)  # released checkpoints are usually bfloat16
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(
        _model_card(arch, preset, type(config).__name__, params, len(tokenizer)), encoding="utf-8"
    )
    summary = {
        "path": str(out),
        "arch": arch,
        "preset": preset,
        "parameters": params,
        "vocab_size": config.vocab_size,
        "tokenizer_tokens": len(tokenizer),
        "untrained": True,
    }
    (out / "phitune_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_arguments(output: str | Path, arch: str, preset: str, dtype: str, overwrite: bool) -> Path:
    if arch not in ARCHS:
        raise PhituneError(f"--arch {arch!r}: unknown architecture; choose one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise PhituneError(f"--preset {preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise PhituneError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PhituneError(f"{out}: directory exists and is not empty; pass --overwrite or choose another path")
    return out


def _corpus_lines(corpus: str | Path | None) -> list[str]:
    """The tokenizer's training text: the given file, else the built-in corpus; one entry per line."""
    if corpus is not None:
        if not Path(corpus).is_file():
            raise PhituneError(f"--corpus {corpus}: file not found; pass a UTF-8 text file to train the tokenizer on")
        text = Path(corpus).read_text(encoding="utf-8")
    else:
        text = default_corpus()
    return [line for line in text.splitlines() if line.strip()]


def _model_config(arch: str, preset: str, shape: dict, ids: dict[str, Any], tokens: int):
    import transformers

    config_class = getattr(transformers, ARCHS[arch].config_class)
    # Round the embedding table up to a multiple of 64, as released models do.
    vocab_size = (tokens + 63) // 64 * 64
    extra = {"original_max_position_embeddings": shape["max_position_embeddings"]} if arch == "phi3" else {}
    if arch == "phi3":
        shape["num_key_value_heads"] = shape["num_attention_heads"]  # Phi-3-mini has no GQA
    config = config_class(
        vocab_size=vocab_size,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
        **shape,
        **extra,
    )
    config.phitune_untrained = True
    config.phitune_created_with = f"phitune create-model --arch {arch} --preset {preset}"
    return config


def _model_card(arch: str, preset: str, class_name: str, params: int, tokens: int) -> str:
    spec = ARCHS[arch]
    return (
        f"# UNTRAINED {arch} model ({preset} preset)\n\n"
        f"**These weights are random.** This model was built by `phitune create-model` to exercise the\n"
        f"{spec.family} code paths without downloading anything. It has not been pre-trained and\n"
        f"produces noise until fine-tuned; do not use it for anything but tests and demos.\n\n"
        f"- architecture: `{class_name}` ({params:,} parameters)\n"
        f"- tokenizer: byte-level BPE trained locally, {tokens} tokens, "
        f"special tokens {', '.join(_special_tokens(spec))}\n"
        f"- chat template: the {spec.family} format; end-of-turn token `{spec.end_of_turn}`\n"
    )
