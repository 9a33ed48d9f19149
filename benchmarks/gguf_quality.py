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
    result = {"machine": cpu(), "model": "SmolLM2-135M-Instruct (no fine-tune)", "data": str(DATA.name), "rows": rows}
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
    lines.append("")
    (results / "gguf_quality.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
