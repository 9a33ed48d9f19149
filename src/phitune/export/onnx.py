"""`phitune export onnx`: a fine-tune as an ONNX Runtime GenAI model (int4 / int8 / fp16 / fp32).

The model builder of onnxruntime-genai does the conversion (graph, quantization, genai_config,
tokenizer files); we give it a plain transformers model: an adapter is merged first, exactly as
`phitune merge` does. The builder runs in its own process: it prints progress freely and keeps
large temporary state that should not outlive the export. The output dir appears whole or not
at all.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from phitune.backends import require_genai
from phitune.errors import PhituneError, last_line
from phitune.outputs import refuse_non_empty, staged

log = logging.getLogger("phitune")

PRECISIONS = ("int4", "int8", "fp16", "fp32")
DEVICES = ("cpu", "cuda")
# The builder's int4 settings phitune uses: k-quant, the output head and the most sensitive layers
# in int8, blocks of 16 kept the most quality of the int4 settings tried on the real model
# (benchmarks/results/onnx_int4_quality.md); the builder's own default (RTN, block 32) lost more.
QUANT_OPTIONS = {"int4": {"algo_config": "k_quant_mixed", "block_size": "16"}}


def require_builder() -> None:
    require_genai()
    try:
        import onnx_ir  # noqa: F401 - the builder's dependency, not declared by its wheel
    except ImportError as exc:
        raise PhituneError("the ONNX model builder needs onnx-ir: pip install 'phitune[onnx]'") from exc


def export_onnx(
    source: str | Path,
    output: str | Path,
    *,
    precision: str = "int4",
    device: str = "cpu",
    base: str | None = None,
    overwrite: bool = False,
    options: dict[str, str] | None = None,
) -> Path:
    """`options`: builder --extra_options over phitune's QUANT_OPTIONS for the precision."""
    from phitune.export.merge import merge
    from phitune.models import refuse_classifier, resolve_trained

    source, output = Path(source), Path(output)
    if precision not in PRECISIONS:
        raise PhituneError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise PhituneError(f"--device {device}: use one of {', '.join(DEVICES)}")
    if precision == "fp16" and device == "cpu":
        raise PhituneError("--precision fp16 runs on cuda; on cpu use int4 (smallest), int8 or fp32 (exact)")
    refuse_non_empty(output, overwrite)
    require_builder()
    model_path, adapter = resolve_trained(source)
    base_model = base or model_path
    refuse_classifier(adapter or model_path)
    with tempfile.TemporaryDirectory(prefix="phitune-export-") as work, staged(output) as tmp:
        if adapter:
            merged = Path(work) / "merged"
            merge(source, merged, base=base)
            model_path = str(merged)
        options = QUANT_OPTIONS.get(precision, {}) | (options or {})
        _build(model_path, tmp, precision, device, Path(work) / "cache", name=str(source), options=options)
        for folder in (Path(adapter) if adapter else None, source, Path(model_path)):
            if folder and (folder / "task.json").is_file():
                shutil.copy(folder / "task.json", tmp / "task.json")
                break
        (tmp / "phitune_export.json").write_text(
            json.dumps(
                {
                    "source": str(source),
                    "base": base_model,
                    "adapter": adapter,
                    "precision": precision,
                    "device": device,
                    "builder_options": options,
                },
                indent=2,
            )
            + "\n"
        )
    return output


def check_export(
    output: str | Path, source: str | Path, *, data: str | None = None, prompts: int = 16, max_new_tokens: int = 32
) -> dict:
    """Greedy tokens of the ONNX model against the PyTorch (merged) model on the same prompt
    ids, the ONNX tokenizer's prompt ids against transformers', and perplexity on held-out text."""
    from phitune.backends import OnnxBackend
    from phitune.evaluate.lm import lm_metrics
    from phitune.export.verify import held_out, held_out_prompts, token_agreement
    from phitune.generate import greedy_ids, prompt_ids
    from phitune.models import load_for_inference, merged_model

    onnx = OnnxBackend(str(output))
    model, tokenizer = load_for_inference(str(source))
    if hasattr(model, "merge_and_unload"):
        model = merged_model(model)  # the weights the export was built from
    split = held_out(Path(source), data, tokenizer)
    asked = [prompt for prompt, _ in held_out_prompts(split, prompts)]
    same_prompt = exact = 0
    agreement = 0.0
    for prompt in asked:
        ids = prompt_ids(tokenizer, prompt)
        if not isinstance(prompt, str):
            same_prompt += onnx.prompt_ids(prompt) == ids
        reference = greedy_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens)
        got = list(onnx.generate_ids(ids, max_new_tokens=max_new_tokens))
        exact += got == reference
        agreement += token_agreement(got, reference)
    report = {
        "prompts": len(asked),
        "greedy_exact": exact / len(asked),
        "token_agreement": agreement / len(asked),
        "chat_prompt_ids_equal": same_prompt / max(1, sum(not isinstance(p, str) for p in asked)),
    }
    if split and split.examples:
        examples = split.examples[:64]
        torch_ppl = lm_metrics(model, examples, batch_size=8, pad_id=tokenizer.pad_token_id, device=model.device)[
            "perplexity"
        ]
        report |= {
            "perplexity_torch": torch_ppl,
            "perplexity_onnx": _onnx_perplexity(Path(output), examples),
            "held_out_examples": len(examples),
        }
        report["perplexity_change"] = report["perplexity_onnx"] / torch_ppl - 1.0
    return report


def _onnx_perplexity(output: Path, examples: list) -> float:
    """exp(mean cross-entropy) over the trained tokens, by ONNX Runtime (one full forward each)."""
    import numpy as np
    import onnxruntime as ort

    from phitune.export.verify import runtime_perplexity

    session = ort.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    config = json.loads((output / "genai_config.json").read_text())["model"]["decoder"]
    past = {i.name: i for i in session.get_inputs() if i.name.startswith("past_key_values")}

    def logits_of(e):
        ids = np.array([e.input_ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for name, meta in past.items():
            dtype = np.float16 if "float16" in meta.type else np.float32
            feed[name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), dtype=dtype)
        return session.run(["logits"], feed)[0][0]

    return runtime_perplexity(examples, logits_of)


# --- multi-LoRA: one base graph with LoRA inputs, one .onnx_adapter per fine-tune ---------------


def _build(
    model_path: str,
    out: Path,
    precision: str,
    device: str,
    cache: Path,
    *,
    adapter: str | None = None,
    name: str | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """onnxruntime-genai's model builder in its own process; `out` is removed again when it fails.
    `options`: the builder's --extra_options (KEY=VALUE)."""
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        model_path,
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        device,
        "-c",
        str(cache),
    ]
    extra = dict(options or {}) | ({"adapter_path": adapter} if adapter else {})
    if extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        raise PhituneError(
            f"{name or adapter or model_path}: the onnxruntime-genai model builder failed "
            f"({last_line(proc.stderr + proc.stdout)[:300]}); "
            "run `python -m onnxruntime_genai.models.builder` yourself to see why"
        )


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _lora_tensors(model_file: Path) -> dict:
    """The LoRA weights of a built graph, by initializer name, as numpy arrays."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_file), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if _is_lora(t.name)}


def export_multi_lora(
    base: str,
    adapters: dict[str, str],
    output: str | Path,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """The base once, with every LoRA weight a graph input defaulting to zero (the base model),
    and each adapter as adapters/NAME.onnx_adapter holding those inputs' values. The builder makes
    each adapter's weights (its split of fused projections, transposes and scaling), so they are
    laid out exactly as the graph reads them."""
    import onnx

    output = Path(output)
    if precision in ("int4", "int8"):
        raise PhituneError(
            f"--adapter with --precision {precision}: the builder would quantize the LoRA weights into the graph, "
            "so they could not be swapped; use fp32 (cpu) or fp16 (cuda), or export each fine-tune merged in int4"
        )
    refuse_non_empty(output, overwrite)
    require_builder()
    resolved = _lora_adapters(base, adapters)
    with tempfile.TemporaryDirectory(prefix="phitune-multilora-") as scratch, staged(output) as tmp:
        work = Path(scratch)
        first = next(iter(resolved.values()))
        _build(base, tmp, precision, device, work / "cache", adapter=first)
        graph_file = tmp / "model.onnx"
        model = onnx.load(str(graph_file), load_external_data=True)
        slots = {t.name: t for t in model.graph.initializer if _is_lora(t.name)}
        _write_adapters(base, resolved, slots, tmp / "adapters", work, precision=precision, device=device)
        _lora_inputs_default_to_zero(model, slots)
        graph_file.unlink()
        (tmp / "model.onnx.data").unlink(missing_ok=True)
        onnx.save(model, str(graph_file), save_as_external_data=True, location="model.onnx.data")
        (tmp / "phitune_export.json").write_text(
            json.dumps(
                {
                    "base": base,
                    "adapters": {n: str(a) for n, a in resolved.items()},
                    "precision": precision,
                    "device": device,
                },
                indent=2,
            )
            + "\n"
        )
    return output


def _write_adapters(
    base: str, resolved: dict[str, str], slots: dict, folder: Path, work: Path, *, precision: str, device: str
) -> None:
    """folder/NAME.onnx_adapter for each adapter: its LoRA weights as the builder lays them out,
    checked to fill the graph's LoRA inputs (`slots`) exactly."""
    folder.mkdir()
    for i, (name, adapter) in enumerate(resolved.items()):
        built = work / f"a{i}"
        _build(base, built, precision, device, work / "cache", adapter=adapter)
        tensors = _lora_tensors(built / "model.onnx")
        shutil.rmtree(built)
        if set(tensors) != set(slots) or any(tuple(tensors[k].shape) != tuple(slots[k].dims) for k in slots):
            raise PhituneError(
                f"--adapter {name}: its LoRA targets or rank differ from {next(iter(resolved))}'s; "
                "adapters served together need the same target_modules and r"
            )
        _write_onnx_adapter(folder / f"{name}.onnx_adapter", tensors)


def _lora_adapters(base: str, adapters: dict[str, str]) -> dict[str, str]:
    """NAME -> the adapter directory of each --adapter NAME=PATH, refused unless ONNX Runtime can
    carry it (a plain LoRA, not on lm_head)."""
    from phitune.models import resolve_trained

    resolved = {}
    for name, path in adapters.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise PhituneError(f"--adapter {name}={path}: the name may hold letters, digits, '_', '.', '-' only")
        base_of, adapter = resolve_trained(path)
        if adapter is None:
            raise PhituneError(f"--adapter {name}={path}: holds no LoRA adapter")
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
        kind = config.get("peft_type")
        if kind != "LORA" or config.get("use_dora"):
            raise PhituneError(
                f"--adapter {name}={path}: a {kind} adapter{' with DoRA' if kind == 'LORA' else ''}; "
                "ONNX Runtime adapters carry plain LoRA weights only (merge it and export it alone)"
            )
        if "lm_head" in (config.get("target_modules") or []):
            # onnxruntime-genai 0.18's builder overwrites lm_head's weight with the LoRA's and wires the
            # sum nowhere: the graph does not load. Seen here; refused until the builder handles it.
            raise PhituneError(
                f"--adapter {name}={path}: its LoRA targets lm_head, which the onnxruntime-genai "
                "builder cannot export as an adapter; train without lm_head in method.target_modules, "
                "or export this fine-tune merged on its own"
            )
        if Path(base_of).resolve() != Path(base).resolve() and base_of != base:
            log.warning("--adapter %s was trained on %s, exported on %s", name, base_of, base)
        resolved[name] = adapter
    return resolved


def _write_onnx_adapter(path: Path, tensors: dict) -> None:
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


def _lora_inputs_default_to_zero(model, slots: dict) -> None:
    """Each LoRA weight becomes a graph input whose default (the initializer) is zero: no adapter = the base."""
    import numpy as np
    from onnx import helper, numpy_helper

    for name, tensor in slots.items():
        zeros = numpy_helper.from_array(np.zeros(tuple(tensor.dims), dtype=numpy_helper.to_array(tensor).dtype), name)
        tensor.CopyFrom(zeros)
        model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
