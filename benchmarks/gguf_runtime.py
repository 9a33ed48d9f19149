"""A real fine-tune in llama.cpp (GGUF f16, q8_0, q4_k_m; merged, and base + LoRA) beside
PyTorch and ONNX Runtime GenAI int4: file size, load time, prompt and generation tokens/s on the
same held-out prompts, and each export's agreement with PyTorch (`phitune export gguf --check`).

The fine-tune is `phitune demo` on SmolLM2-135M-Instruct (the café LoRA; `--run DIR` to reuse
one). Every runtime runs in its own process with 2 threads, interleaved over `--repeats` rounds;
medians. Generation is forced to `--new` tokens (no early stop) so that every runtime does the
same work.

    python benchmarks/gguf_runtime.py [--run DIR] [--repeats 3] [--new 64]
    # writes benchmarks/results/gguf_runtime.{md,json}
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu  # noqa: E402
from _torch_generate import prefill_and_decode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THREADS = 2


def _prompts(run: Path, count: int = 8) -> list[list[int]]:
    from transformers import AutoTokenizer

    from phitune.inference.prompts import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    rows = [
        json.loads(line)["messages"] for line in (REPO / "examples/data/support_val.jsonl").read_text().splitlines()
    ]
    return [prompt_ids(tokenizer, m[:-1]) for m in rows[:count]]


def _torch(path: str, prompts, new: int, dtype: str) -> dict:
    import torch

    from phitune.models import load_for_inference

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model, _ = load_for_inference(path, dtype=getattr(torch, dtype))
    model = model.merge_and_unload()
    loaded = time.perf_counter() - start
    prefill = decode = 0.0
    for ids in prompts:
        took = prefill_and_decode(model, ids, new)
        prefill, decode = prefill + took[0], decode + took[1]
    return _rates(loaded, prefill, decode, prompts, new)


def _llama(folder: str, prompts, new: int) -> dict:
    from phitune.export.gguf_check import open_llama

    start = time.perf_counter()
    llm = open_llama(folder, n_ctx=1024)
    loaded = time.perf_counter() - start
    prefill = decode = 0.0
    for ids in prompts:
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)):
            now = time.perf_counter()
            if i == 0:
                prefill += now - start  # the first token comes with the prompt
                start = now
            elif i == new - 1:
                decode += now - start
                break
    llm.close()
    return _rates(loaded, prefill, decode, prompts, new, first_with_prompt=True)


def _onnx(folder: str, prompts, new: int) -> dict:
    import onnxruntime_genai as og

    start = time.perf_counter()
    model = og.Model(folder)
    loaded = time.perf_counter() - start
    prefill = decode = 0.0
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens([ids])
        generator.generate_next_token()
        prefill += time.perf_counter() - start
        start = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        decode += time.perf_counter() - start
    return _rates(loaded, prefill, decode, prompts, new, first_with_prompt=True)


def _rates(loaded, prefill, decode, prompts, new, first_with_prompt=False) -> dict:
    generated = len(prompts) * (new - 1 if first_with_prompt else new)
    return {
        "load_s": loaded,
        "prompt_tok_s": sum(len(p) for p in prompts) / prefill,
        "generate_tok_s": generated / decode,
    }


def child(kind: str, path: str, run: str, new: int) -> None:
    prompts = _prompts(Path(run))
    if kind.startswith("torch-"):
        out = _torch(path, prompts, new, kind.removeprefix("torch-"))
    elif kind == "onnx":
        out = _onnx(path, prompts, new)
    else:
        out = _llama(path, prompts, new)
    print(json.dumps(out))


def _phitune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "phitune", *args], check=True, capture_output=True, text=True)


def _exports(run: Path, work: Path) -> dict[str, tuple[str, Path, Path | None]]:
    """name -> (child kind, what it loads, the files whose size counts)."""
    out = {
        "PyTorch fp32 (transformers generate)": ("torch-float32", run, None),
        "PyTorch bf16 (transformers generate)": ("torch-bfloat16", run, None),
    }
    for quant in ("f16", "q8_0", "q4_k_m"):
        folder = work / f"gguf-{quant}"
        _phitune("export", "gguf", str(run), "--output", str(folder), "--quant", quant, "--check")
        out[f"llama.cpp GGUF {quant}"] = ("llama", folder, folder / "model.gguf")
    lora = work / "gguf-lora-f16"
    _phitune("export", "gguf", str(run), "--output", str(lora), "--quant", "f16", "--lora", "--check")
    out["llama.cpp GGUF f16 base + LoRA"] = ("llama", lora, lora / "adapter.gguf")
    onnx = work / "onnx-int4"
    _phitune("export", "onnx", str(run), "--output", str(onnx), "--precision", "int4", "--check")
    out["ONNX Runtime GenAI int4"] = ("onnx", onnx, onnx)
    return out


def _size(path: Path | None) -> float | None:
    if path is None:
        return None
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a finished run of SmolLM2 (default: `phitune demo` into a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.new)
    work = Path(tempfile.mkdtemp(prefix="phitune-gguf-bench-"))
    run = Path(args.run) if args.run else work / "demo" / "run"
    if not args.run:
        _phitune("demo", "--output", str(work / "demo"))
    exports = _exports(run, work)
    runs: dict[str, list[dict]] = {name: [] for name in exports}
    for _ in range(args.repeats):
        for name, (kind, path, _) in exports.items():
            cmd = [sys.executable, __file__, "--child", kind, str(path), str(run), "--new", str(args.new)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    checks = {}
    for name, (kind, path, _) in exports.items():
        if (Path(path) / "check.json").is_file():
            checks[name] = json.loads((Path(path) / "check.json").read_text())
    sizes = {name: _size(files) for name, (_, _, files) in exports.items()}
    _write(args, med, checks, sizes, runs)


def _write(args, med, checks, sizes, runs) -> None:
    result = {
        "machine": cpu(),
        "model": "SmolLM2-135M-Instruct + the demo's café LoRA (r16, all-linear)",
        "threads": THREADS,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "median": med,
        "checks": checks,
        "size_mib": sizes,
        "runs": runs,
    }
    out = REPO / "benchmarks" / "results"
    (out / "gguf_runtime.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# A real fine-tune in llama.cpp, PyTorch and ONNX Runtime ({cpu()}; {THREADS} threads; 8 held-out "
        f"prompts, {args.new} new tokens forced; median of {args.repeats})",
        "",
        "`python benchmarks/gguf_runtime.py` — SmolLM2-135M-Instruct + the demo's café LoRA. Agreement and "
        "perplexity: `--check` against PyTorch fp32 (16 held-out prompts, 32 greedy tokens; 40 held-out rows). "
        "The LoRA row's size is the adapter file alone (its base is the f16 file, shared by every fine-tune).",
        "",
        "| runtime | size MiB | load s | prompt tok/s | generation tok/s | greedy = PyTorch | token agreement "
        "| answers right | held-out ppl change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in med.items():
        c = checks.get(name, {})
        size = f"{sizes[name]:.1f}" if sizes[name] is not None else "—"
        answers = f"{c['answers_exact_gguf']:.2f}" if "answers_exact_gguf" in c else "—"
        quality = (
            f"{c['greedy_exact']:.2f} | {c['token_agreement']:.3f} | {answers} | {c['perplexity_change']:+.4f}"
            if c
            else "reference | | |"
        )
        lines.append(
            f"| {name} | {size} | {m['load_s']:.2f} | {m['prompt_tok_s']:.0f} | {m['generate_tok_s']:.1f} | {quality} |"
        )
    lines.append("")
    (out / "gguf_runtime.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
