"""ONNX Runtime GenAI int4 vs PyTorch eager fp32 on the CPU: prompt processing and generation.

Same model (`create-model --preset small`, ~28.5M Phi-3; random weights do not change the
arithmetic), same prompt ids, the same number of new tokens (no early stop), one thread setting
for both, runs interleaved so machine noise hits both alike; the median of `--repeats` runs.

    python benchmarks/onnx_speed.py [--repeats 5] [--prompt 256] [--new 128]
    # writes benchmarks/results/onnx_speed.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torch_times(model_dir: Path, ids: list[int], new: int) -> tuple[float, float]:
    import torch
    from _torch_generate import prefill_and_decode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return prefill_and_decode(model, ids, new)


def onnx_times(onnx_dir: Path, ids: list[int], new: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens([ids])  # prompt processing
    generator.generate_next_token()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    return prefill, time.perf_counter() - start


def child(kind: str, path: str, prompt: int, new: int) -> None:
    import torch

    torch.set_num_threads(2)
    ids = [(7 * i) % 900 + 20 for i in range(prompt)]
    pre, gen = (torch_times if kind == "torch" else onnx_times)(Path(path), ids, new)
    # generation time covers new-1 tokens after the first (the first comes with the prompt)
    print(json.dumps({"prefill_tok_s": prompt / pre, "generate_tok_s": (new - 1) / gen}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.prompt, args.new)
    work = Path(tempfile.mkdtemp(prefix="phitune-onnx-bench-"))
    model, onnx = work / "small", work / "small-int4"
    subprocess.run(
        [sys.executable, "-m", "phitune", "create-model", str(model), "--preset", "small"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "-m", "phitune", "export", "onnx", str(model), "--output", str(onnx), "--precision", "int4"],
        check=True,
        capture_output=True,
    )
    runs: dict[str, list[dict]] = {"torch fp32 (eager)": [], "onnx int4": []}
    for _ in range(args.repeats):
        for name, kind, path in (("torch fp32 (eager)", "torch", model), ("onnx int4", "onnx", onnx)):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    str(path),
                    "--prompt",
                    str(args.prompt),
                    "--new",
                    str(args.new),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    base, fast = med["torch fp32 (eager)"], med["onnx int4"]
    ratios = {k: fast[k] / base[k] for k in base}
    result = {
        "model": "create-model --preset small (~28.5M Phi-3)",
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "threads": 2,
        "median": med,
        "onnx_over_torch": ratios,
        "runs": runs,
    }
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# ONNX Runtime GenAI int4 vs PyTorch eager fp32 (CPU, 2 threads, {args.prompt}-token prompt, "
        f"{args.new} new tokens, median of {args.repeats})",
        "",
        "| backend | prompt processing tok/s | generation tok/s |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {m['prefill_tok_s']:.0f} | {m['generate_tok_s']:.1f} |" for n, m in med.items()]
    lines += [f"| **int4 / fp32** | **{ratios['prefill_tok_s']:.2f}x** | **{ratios['generate_tok_s']:.2f}x** |", ""]
    (out / "onnx_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
