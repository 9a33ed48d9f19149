"""What int4 ONNX export costs in quality on a real fine-tune, and which builder options keep it.

Each variant is one onnxruntime-genai model-builder setting, built from the same merged model and
checked as `phitune export onnx --check` checks: greedy replies against PyTorch fp32 on the run's
held-out prompts (exact and token agreement = the matching prefix / the longer reply) and
perplexity on the held-out answers by ONNX Runtime against PyTorch fp32.

    python benchmarks/onnx_int4_quality.py RUN [--variants default,acc1,...] [--prompts 32] [--append]
    # RUN: a training output on the real model, e.g. runs/dictionary-eng-deu
    # writes benchmarks/results/onnx_int4_quality.{md,json}
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (precision, builder --extra_options, what it changes)
VARIANTS = {
    "default": (
        "int4",
        {},
        "the builder's defaults: RTN, block 32, accuracy level 4 (int8 activations), tied head int4",
    ),
    "acc1": ("int4", {"accuracy_level": "1"}, "fp32 activations in the int4 matmuls"),
    "lm_head_int8": ("int4", {"matmul_mixed_precision": "last_matmul:int8"}, "output head in int8"),
    "lm_head_fp32": (
        "int4",
        {"shared_embeddings": "false", "nodes_to_exclude": "/lm_head/MatMul"},
        "output head unquantised (untied from the embeddings)",
    ),
    "lm_head_int8_untied": (
        "int4",
        {"shared_embeddings": "false", "matmul_mixed_precision": "last_matmul:int8"},
        "output head int8, untied from the embeddings",
    ),
    "asym": ("int4", {"is_symmetric": "false"}, "asymmetric uint4 (the Q4_1 source's own kind of grid)"),
    "asym_lm_head_fp32": (
        "int4",
        {"is_symmetric": "false", "shared_embeddings": "false", "nodes_to_exclude": "/lm_head/MatMul"},
        "asymmetric uint4, head unquantised",
    ),
    "k_quant": ("int4", {"algo_config": "k_quant"}, "k-quant instead of RTN"),
    "k_quant_mixed": ("int4", {"algo_config": "k_quant_mixed"}, "k-quant; head and sensitive layers int8"),
    "k_quant_mixed_block16": (
        "int4",
        {"algo_config": "k_quant_mixed", "block_size": "16"},
        "k_quant_mixed, block size 16",
    ),
    "block16": ("int4", {"block_size": "16"}, "block size 16"),
    "block128": ("int4", {"block_size": "128"}, "block size 128"),
    "int8": ("int8", {}, "int8 weights"),
    "fp32": ("fp32", {}, "no quantisation (reference)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="training output dir of a fine-tune (its validation file is the held-out data)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "onnx_int4_quality"))
    parser.add_argument("--append", action="store_true", help="add these variants to the results already in --out")
    args = parser.parse_args()

    from phitune.export.merge import merge
    from phitune.export.onnx import _build, check_export

    rows = []
    with tempfile.TemporaryDirectory(prefix="phitune-int4-") as work:
        merged = Path(work) / "merged"
        merge(args.run, merged)
        for name in args.variants.split(","):
            precision, options, what = VARIANTS[name]
            out = Path(work) / name
            started = time.perf_counter()
            try:
                _build(str(merged), out, precision, "cpu", Path(work) / "cache", options=options, name=name)
                built = time.perf_counter() - started
                report = check_export(out, args.run, prompts=args.prompts)
            except Exception as exc:  # a builder setting that writes a broken graph is a result too
                rows.append(
                    {
                        "variant": name,
                        "precision": precision,
                        "options": options,
                        "what": what,
                        "failed": str(exc).splitlines()[0][:200],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                continue
            size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
            rows.append(
                {
                    "variant": name,
                    "precision": precision,
                    "options": options,
                    "what": what,
                    "size_mb": round(size, 1),
                    "build_s": round(built, 1),
                    **report,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    if args.append and out.with_suffix(".json").is_file():  # a second round of variants joins the first
        fresh = {r["variant"] for r in rows}
        rows = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if r["variant"] not in fresh] + rows
    out.with_suffix(".json").write_text(json.dumps({"run": args.run, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(rows, args.run))
    print(render(rows, args.run))


def render(rows: list[dict], run: str) -> str:
    ok = next(r for r in rows if "failed" not in r)
    lines = [
        f"# int4 ONNX export quality on `{run}`",
        "",
        f"`python benchmarks/onnx_int4_quality.py {run} --variants NAMES [--append]`; {ok['prompts']} held-out "
        f"prompts, perplexity on {ok.get('held_out_examples', 0)} held-out answers. PyTorch fp32 perplexity "
        f"{ok.get('perplexity_torch', float('nan')):.3f}.",
        "",
        "| variant | builder options | size MB | greedy exact | token agreement | perplexity change |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        if "failed" in r:
            lines.append(
                f"| {r['variant']} ({r['what']}) | `{r['precision']}` {opts} | - | failed: {r['failed']} | | |"
            )
            continue
        lines.append(
            f"| {r['variant']} ({r['what']}) | `{r['precision']}` {opts} | {r['size_mb']:.0f} | "
            f"{r['greedy_exact']:.0%} | {r['token_agreement']:.0%} | {r.get('perplexity_change', float('nan')):+.1%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
