"""`phitune export gguf`: a fine-tune as GGUF for llama.cpp, Ollama and LM Studio.

Merged (one file: the base with the adapter folded in) or `--lora` (the adapter as a GGUF LoRA
beside a base GGUF that is written once per base model and quantization, and shared by every
fine-tune of that base). f32, f16, bf16 and q8_0 are written by the `gguf` package's writer;
the other quantizations (q4_k_m, q5_k_m, ...) by llama.cpp's own quantizer through
llama-cpp-python, from an f32 (bf16 past 1.5B parameters) file written first. An Ollama
Modelfile goes beside the file. The output directory appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from phitune.errors import PhituneError, last_line
from phitune.outputs import refuse_non_empty, staged

WRITTEN = ("f32", "f16", "bf16", "q8_0")  # by the gguf package's writer
QUANTIZED = (  # by llama.cpp's quantizer (llama_model_quantize)
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
)
QUANTS = WRITTEN + QUANTIZED
# Past this many parameters the quantizer's input is written in bf16 rather than f32 (half the
# temporary disk); below it f32 keeps the merged fine-tune's weights exactly.
BF16_INPUT_PARAMETERS = 1.5e9
LLAMA_CPP_INSTALL = (
    "make llama-cpp (builds llama-cpp-python once, ~4 min, cached), or pip install 'phitune[gguf-quantize]'"
)


@dataclass
class Plan:
    """What an export will do, all checked before anything heavy is loaded."""

    source: Path
    base: str
    adapter: str | None
    quant: str
    lora: bool
    base_gguf: Path | None
    name: str
    base_template: str | None = None  # the base tokenizer's chat template (--lora: read with the tokenizers)


def plan_export(
    source: str | Path,
    *,
    quant: str = "f16",
    lora: bool = False,
    base_gguf: str | Path | None = None,
    base: str | None = None,
    name: str | None = None,
) -> Plan:
    from phitune.export.gguf_model import gguf_arch
    from phitune.models import refuse_classifier, resolve_trained

    source = Path(source)
    if quant not in QUANTS:
        raise PhituneError(f"--quant {quant}: use one of {', '.join(QUANTS)}")
    if quant in QUANTIZED:
        require_llama_cpp(f"--quant {quant} (llama.cpp's quantizer)")
    if not source.exists():
        raise PhituneError(f"{source}: not found; pass a training output dir, an adapter dir or a model dir")
    base_path, adapter = resolve_trained(source)
    base_path = base or base_path
    refuse_classifier(adapter or base_path)
    if base_gguf and not lora:
        raise PhituneError(f"--base-gguf {base_gguf}: only with --lora (a merged export holds the base itself)")
    if lora and adapter is None:
        raise PhituneError(
            f"{source}: a full fine-tune (no adapter) has no LoRA to export; drop --lora to export the whole model"
        )
    gguf_arch(_config(base_path), str(source))
    if base_gguf:
        _check_base_gguf(Path(base_gguf))
    name = name or source.resolve().name
    return Plan(source, str(base_path), adapter, quant, lora, Path(base_gguf) if base_gguf else None, name)


def _config(model_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise PhituneError(f"{model_path}: no readable config.json ({str(exc).splitlines()[0][:160]})") from None


def require_llama_cpp(what: str) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PhituneError(f"{what} needs llama-cpp-python, which is not installed here: {LLAMA_CPP_INSTALL}") from None


def export_gguf(
    source: str | Path,
    output: str | Path,
    *,
    quant: str = "f16",
    lora: bool = False,
    base_gguf: str | Path | None = None,
    base: str | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write OUTPUT/model.gguf (or OUTPUT/adapter.gguf + base.gguf with `lora`), a Modelfile and
    phitune_export.json. `name`: the model's name in the file and the Modelfile (default: the
    source directory's)."""
    from phitune.export.ollama import write_modelfile
    from phitune.inference.prompts import stop_token_ids

    output = Path(output)
    plan = plan_export(source, quant=quant, lora=lora, base_gguf=base_gguf, base=base, name=name)
    refuse_non_empty(output, overwrite)
    with tempfile.TemporaryDirectory(prefix="phitune-gguf-") as scratch, staged(output) as tmp:
        tmp.mkdir(parents=True)
        work = Path(scratch)
        if plan.lora:
            tokenizer, generation = _fine_tune_tokenizer(plan)
            files = _export_lora(plan, tokenizer, tmp, work)
        else:
            model, tokenizer = _merged(plan)
            generation = model.generation_config
            _write_quantized(model, tokenizer, tmp / "model.gguf", plan.quant, plan.name, work)
            files = {"model": "model.gguf"}
        stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, generation)]
        write_modelfile(tmp, files, tokenizer, stops, sampling(generation), str(plan.source), plan.name)
        manifest = {
            "source": str(plan.source),
            "base": plan.base,
            "adapter": plan.adapter,
            "quant": plan.quant,
            "files": files,
        }
        (tmp / "phitune_export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return output


def sampling(generation) -> dict:
    """generation_config's sampling defaults under llama.cpp / Ollama's names (none when greedy)."""
    if generation is None or not getattr(generation, "do_sample", False):
        return {}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    return {ours: getattr(generation, hf) for hf, ours in names.items() if getattr(generation, hf, None) is not None}


SAMPLING_KEYS = {
    "temperature": "add_sampling_temp",
    "top_p": "add_sampling_top_p",
    "top_k": "add_sampling_top_k",
    "repeat_penalty": "add_sampling_penalty_repeat",
}


def _fine_tune_tokenizer(plan: Plan):
    """The tokenizer the fine-tune was trained with (saved beside the adapter, else the base's)
    and the base's generation settings, without loading any weights."""
    from transformers import AutoTokenizer, GenerationConfig

    assert plan.adapter is not None  # --lora: plan_export found the adapter
    own = Path(plan.adapter) / "tokenizer_config.json"
    tokenizer = AutoTokenizer.from_pretrained(plan.adapter if own.is_file() else plan.base)
    base_tokenizer = AutoTokenizer.from_pretrained(plan.base)
    plan.base_template = base_tokenizer.chat_template
    if len(tokenizer) != len(base_tokenizer):
        raise PhituneError(
            f"{plan.adapter}: its tokenizer has {len(tokenizer)} tokens, the base's {len(base_tokenizer)}; "
            "a LoRA cannot carry new tokens to llama.cpp, export it merged instead (drop --lora)"
        )
    try:
        generation = GenerationConfig.from_pretrained(plan.base)
    except OSError:
        generation = None
    return tokenizer, generation


def _merged(plan: Plan):
    from phitune.models import load_for_inference, merged_model

    model, tokenizer = load_for_inference(plan.base, plan.adapter, device="cpu")
    if plan.adapter:
        if not hasattr(model, "merge_and_unload"):
            raise PhituneError(
                f"{plan.adapter}: a {type(model.peft_config['default']).__name__} adapter cannot be merged into "
                "the weights llama.cpp reads; GGUF export needs LoRA, DoRA or IA3"
            )
        model = merged_model(model)
    return model, tokenizer


# --- writing a model file ---------------------------------------------------------------------


def _write_quantized(model, tokenizer, path: Path, quant: str, name: str, work: Path) -> None:
    if quant in WRITTEN:
        write_model(model, tokenizer, path, quant, name)
        return
    parameters = sum(p.numel() for p in model.parameters())
    first = work / "unquantized.gguf"
    write_model(model, tokenizer, first, "bf16" if parameters > BF16_INPUT_PARAMETERS else "f32", name)
    quantize(first, path, quant)
    first.unlink()


def write_model(model, tokenizer, path: Path, quant: str, name: str) -> None:
    """`model` (a plain transformers causal LM) and `tokenizer` as one GGUF file in `quant` (one of WRITTEN)."""
    import gguf

    from phitune.export.gguf_file import new_writer, write_tensors
    from phitune.export.gguf_model import add_hyperparameters, gguf_arch, model_tensors
    from phitune.export.gguf_vocab import add_vocab

    config = model.config
    arch = gguf_arch(config, name)
    with tempfile.TemporaryDirectory(prefix="phitune-tok-") as tok:
        tokenizer.save_pretrained(tok)  # tokenizer.json as this tokenizer is now, whatever it was loaded from
        writer = new_writer(path, arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model_name(name, tokenizer))
        writer.add_file_type(getattr(gguf.LlamaFileType, TYPES[quant][1]))
        add_hyperparameters(writer, config, arch, name)
        add_vocab(writer, tokenizer, Path(tok), config.vocab_size)
    for key, value in sampling(getattr(model, "generation_config", None)).items():
        getattr(writer, SAMPLING_KEYS[key])(value)
    if quant != "f32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tensors(writer, model_tensors(model, config, arch), getattr(gguf.GGMLQuantizationType, TYPES[quant][0]))


PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def model_name(name: str, tokenizer) -> str:
    """general.name. llama.cpp gives Phi-3 tokens their attributes by the model's *name* (it holds
    "phi3" or "phi-3") and fails to load a vocabulary without Phi-3's tokens under such a name."""
    vocab = tokenizer.get_vocab()
    if any(p in name.lower() for p in ("phi3", "phi-3")) and not all(t in vocab for t in PHI3_TOKENS):
        return name.lower().replace("phi-3", "phi_3").replace("phi3", "phi_3")
    return name


# per quantization: (the type of 2-D tensors, the file type llama.cpp reports), as gguf names
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}


def quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantizer in its own process (it prints freely, and a crash in native code
    ends that process, not this one)."""
    from phitune.hardware import usable_cpus

    cmd = [sys.executable, "-m", "phitune.export.llama_quantize", str(source), str(target), quant, str(usable_cpus())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        raise PhituneError(
            f"--quant {quant}: llama.cpp's quantizer failed ({last_line(proc.stderr + proc.stdout)[:300]})"
        )


# --- the LoRA form -------------------------------------------------------------------------------


def _export_lora(plan: Plan, tokenizer, tmp: Path, work: Path) -> dict[str, str]:
    """adapter.gguf, and base.gguf: a hard link to the shared base file (a copy across file systems)."""
    from phitune.export.gguf_lora import write_lora

    assert plan.adapter is not None  # --lora: plan_export found the adapter
    base_file = plan.base_gguf or shared_base(plan.base, plan.quant, work)
    write_lora(plan.adapter, _config(plan.base), tmp / "adapter.gguf", plan.name)
    local = tmp / "base.gguf"
    try:
        os.link(base_file, local)  # one copy on disk, however many fine-tunes point at it
    except OSError:
        shutil.copyfile(base_file, local)
    files = {"base": "base.gguf", "adapter": "adapter.gguf"}
    if tokenizer.chat_template and tokenizer.chat_template != plan.base_template:
        # the base file carries the base's template; the fine-tune was trained with this one
        (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        files["chat_template"] = "chat_template.jinja"
    return files


def _base_key(base: str, quant: str) -> str:
    """Which base file: the base directory's weights and tokenizer by size and time, the quantization."""
    folder = Path(base).resolve()
    parts = [str(folder), quant, "v1"]
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if f.is_file():
            stat = f.stat()
            parts.append(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def shared_base(base: str, quant: str, work: Path) -> Path:
    """The base model as GGUF in `quant`, written once into phitune's cache and reused."""
    from phitune.import_gguf import cache_dir
    from phitune.models import load_for_inference

    target = cache_dir() / "gguf" / f"{Path(base).name}-{_base_key(base, quant)}-{quant}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_for_inference(base, None, device="cpu")
    partial = work / target.name
    _write_quantized(model, tokenizer, partial, quant, Path(base).name, work)
    shutil.move(str(partial), target.with_suffix(".part"))
    os.replace(target.with_suffix(".part"), target)
    return target


def _check_base_gguf(path: Path) -> None:
    from phitune.export.gguf_model import ARCHITECTURES
    from phitune.import_gguf import read_header

    header = read_header(path)
    readable = sorted({arch.name.lower() for arch in ARCHITECTURES.values()})  # gguf's names: llama, qwen2, phi3
    if header.get("general.architecture") not in readable:
        raise PhituneError(
            f"--base-gguf {path}: a {header.get('general.architecture')!r} GGUF; the base of a phitune "
            f"LoRA is a {', '.join(readable)} model file"
        )
