"""How much each GGUF quantization costs where the model is unsure: SmolLM2-135M-Instruct itself
(no fine-tune: it does not know the café's answers, so its next-token distributions are wide and
a quantization error shows) exported in each quantization and checked by llama.cpp against
PyTorch fp32 on the café's 40 held-out conversations (`phitune export gguf --check --check-data`).

    python benchmarks/gguf_quality.py [--quants f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0]
    # writes benchmarks/results/gguf_quality.{md,json}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "support_val.jsonl"


def main() -> None:
    from phitune.import_gguf import package_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--quants", default="f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    args = ap.parse_args()
    model, _ = package_model()
    work = Path(tempfile.mkdtemp(prefix="phitune-gguf-quality-"))
    rows = {}
    for quant in args.quants.split(","):
        out = work / quant
        cmd = [sys.executable, "-m", "phitune", "export", "gguf", str(model), "--output", str(out), "--quant", quant]
        subprocess.run([*cmd, "--check", "--check-data", str(DATA)], check=True, capture_output=True, text=True)
        rows[quant] = json.loads((out / "check.json").read_text())
        rows[quant]["size_mib"] = (out / "model.gguf").stat().st_size / 2**20
    dequantized = _dequantized(model, work / "q8_0") if "q8_0" in rows else None
    result = {
        "machine": cpu(),
        "model": "SmolLM2-135M-Instruct (no fine-tune)",
        "data": str(DATA.name),
        "rows": rows,
        "q8_0_dequantized_fp32": dequantized,
    }
    results = REPO / "benchmarks" / "results"
    (results / "gguf_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    first = next(iter(rows.values()))
    lines = [
        f"# GGUF quantizations where the model is unsure ({cpu()})",
        "",
        "`python benchmarks/gguf_quality.py` — SmolLM2-135M-Instruct without a fine-tune, checked by llama.cpp "
        f"against PyTorch fp32 on {DATA.name} ({first.get('held_out_examples')} held-out rows: PyTorch perplexity "
        f"{first.get('perplexity_torch', float('nan')):.3f}; {first['prompts']} prompts, 32 greedy tokens).",
        "",
        "| quant | size MiB | greedy = PyTorch | token agreement | perplexity (llama.cpp) | change |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for quant, r in rows.items():
        lines.append(
            f"| {quant} | {r['size_mib']:.1f} | {r['greedy_exact']:.2f} | {r['token_agreement']:.3f} | "
            f"{r['perplexity_gguf']:.3f} | {r['perplexity_change']:+.2%} |"
        )
    if dequantized:
        lines += [
            "",
            "The same q8_0 file read by transformers' GGUF loader (weights dequantized, fp32 arithmetic): "
            f"greedy {dequantized['greedy_exact']:.2f}, token agreement {dequantized['token_agreement']:.3f}, "
            f"perplexity change {dequantized['perplexity_change']:+.2%}: what llama.cpp loses beyond this is its own "
            "arithmetic (8-bit activations with q8_0 weights), not the file.",
        ]
    lines.append("")
    (results / "gguf_quality.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _dequantized(model: Path, export: Path) -> dict:
    """The q8_0 file's weights in PyTorch fp32 (transformers' GGUF reader) against the original
    weights: the same prompts and rows as `--check`."""
    import torch
    from transformers import AutoModelForCausalLM

    from phitune.evaluate.lm import lm_metrics
    from phitune.export.verify import held_out, held_out_prompts, token_agreement
    from phitune.generate import greedy_ids
    from phitune.inference.prompts import prompt_ids
    from phitune.models import load_for_inference

    original, tokenizer = load_for_inference(str(model))
    read = AutoModelForCausalLM.from_pretrained(str(export), gguf_file="model.gguf", dtype=torch.float32).eval()
    split = held_out(model, str(DATA), tokenizer)
    pairs = held_out_prompts(split, 16)
    exact = agreement = 0.0
    for prompt, _ in pairs:
        ids = prompt_ids(tokenizer, prompt)
        want, got = (greedy_ids(m, tokenizer, ids, max_new_tokens=32) for m in (original, read))
        exact += got == want
        agreement += token_agreement(got, want)
    rows = split.examples[:64]
    ppl = [
        lm_metrics(m, rows, batch_size=8, pad_id=tokenizer.pad_token_id, device="cpu")["perplexity"]
        for m in (original, read)
    ]
    return {
        "greedy_exact": exact / len(pairs),
        "token_agreement": agreement / len(pairs),
        "perplexity_change": ppl[1] / ppl[0] - 1,
    }


if __name__ == "__main__":
    main()
