"""Where phitune's short-row attention stops beating SDPA on this CPU: one attention layer's
forward and backward, SDPA (transformers' path, PyTorch's CPU flash kernel) against
`phitune.attention.short_rows_attention`'s matmuls, over row lengths.

    python benchmarks/attention_choice.py [--lengths 32,48,...] [--batch 16]

SmolLM2-135M-Instruct's attention shape (9 query heads, 3 key/value heads, head dim 64), a batch
of right-padded rows (lengths drawn between half and the full width, one full), causal.
Writes benchmarks/results/attention_choice[_TAG].{md,json}; `SHORT_KEYS` in
src/phitune/attention.py is set from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import cpu  # noqa: E402


class _Attention(torch.nn.Module):
    """What the attention functions read from the model's module."""

    num_key_value_groups = 3
    is_causal = True


def _inputs(batch: int, width: int, dtype: torch.dtype):
    torch.manual_seed(0)
    q = torch.randn(batch, 9, width, 64, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, 3, width, 64, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, 3, width, 64, dtype=dtype, requires_grad=True)
    lengths = torch.randint(width // 2, width + 1, (batch,))
    lengths[0] = width
    padding = torch.arange(width)[None] < lengths[:, None]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal[None] & padding[:, None, :])[:, None]  # as transformers' sdpa_mask builds it
    return q, k, v, mask


def _time(fn, q, k, v, mask, repeats: int) -> float:
    module = _Attention().train()

    def step():
        out, _ = fn(module, q, k, v, mask, scaling=0.125)
        out.float().sum().backward()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="32,48,64,96,128,160,192,256,384,512")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from phitune.attention import SHORT_KEYS, short_rows_attention

    def ours(module, q, k, v, mask, scaling):
        # Timed past its own switches: the matmul path at every length and dtype.
        with _matmuls_always():
            return short_rows_attention(module, q, k, v, mask, scaling=scaling)

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for width in map(int, args.lengths.split(",")):
            q, k, v, mask = _inputs(args.batch, width, dtype)
            sdpa = _time(sdpa_attention_forward, q, k, v, mask, args.repeats)
            mine = _time(ours, q, k, v, mask, args.repeats)
            rows.append({"dtype": str(dtype).split(".")[1], "width": width, "sdpa_ms": sdpa, "matmuls_ms": mine})
            print(rows[-1], flush=True)
    write(args, rows, SHORT_KEYS)


class _matmuls_always:
    def __enter__(self):
        import phitune.attention as attention

        self.saved = attention.SHORT_KEYS, attention.MATMUL_DTYPES
        attention.SHORT_KEYS, attention.MATMUL_DTYPES = 10**9, (torch.bfloat16, torch.float32)

    def __exit__(self, *exc) -> None:
        import phitune.attention as attention

        attention.SHORT_KEYS, attention.MATMUL_DTYPES = self.saved


def write(args, rows: list[dict], short_keys: int) -> None:
    tag = f"_{args.tag}" if args.tag else ""
    lines = [
        f"Command: `python benchmarks/attention_choice.py{' --tag ' + args.tag if args.tag else ''}`",
        "",
        f"Machine: {cpu()}; torch {torch.__version__}. One attention layer, forward and backward, batch "
        f"{args.batch} right-padded causal rows, 9 query heads over 3 key/value heads, head dim 64 "
        f"(SmolLM2-135M). Mean of {args.repeats} repeats. phitune uses the matmuls in bf16 "
        f"up to {short_keys} keys, SDPA otherwise.",
        "",
        "| dtype | row width | SDPA (ms) | matmuls (ms) | SDPA / matmuls |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['width']} | {r['sdpa_ms']:.1f} | {r['matmuls_ms']:.1f} | "
            f"{r['sdpa_ms'] / r['matmuls_ms']:.2f}x |"
        )
    out = HERE / "results" / f"attention_choice{tag}"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": cpu(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
