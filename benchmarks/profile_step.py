"""Where a phitune training step spends its time, on the real model: a torch.profiler table.

    python benchmarks/profile_step.py                       # LoRA r16 all-linear, bf16, dictionary rows
    python benchmarks/profile_step.py --precision fp32 --tag fp32

The step is phitune's own (`training.sft.setup` then `train_step`), on SmolLM2-135M-Instruct
(`make real-model`) and short real rows: English-to-German dictionary pairs as chat turns
(`benchmarks/real_data.py`). After `--warmup` steps, `--steps` steps run under the profiler.
Every operator's *self* time goes to one category: base matmuls, LoRA matmuls (an operand with
the LoRA rank as a dimension), attention, dtype casts and copies, elementwise and norms, the
optimizer, embedding and loss, other. "Python and framework overhead" is the wall time of the
steps minus the operators' self time. Writes benchmarks/results/profile_step[_TAG].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import cpu  # noqa: E402
from real_data import dictionary_chat, lora_sets  # noqa: E402

from phitune.training.allocator import in_use, reexec_with_tcmalloc  # noqa: E402

CATEGORIES = (
    "base matmuls",
    "LoRA matmuls",
    "attention",
    "casts and copies",
    "elementwise and norms",
    "optimizer",
    "embedding and loss",
    "other operators",
)
MATMULS = (
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_mkldnn_matmul",
    "mkldnn::matmul",
)
CASTS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::_copy_from")
ELEMENTWISE = (
    "aten::mul",
    "aten::add",
    "aten::add_",
    "aten::pow",
    "aten::mean",
    "aten::rsqrt",
    "aten::silu",
    "aten::silu_backward",
    "aten::neg",
    "aten::cat",
    "aten::sum",
    "aten::div",
    "aten::sub",
    "aten::mul_",
    "aten::cos",
    "aten::sin",
    "aten::where",
    "aten::fill_",
    "aten::zero_",
    "aten::zeros",
    "aten::empty",
    "aten::slice_backward",
    "aten::index_put_",
)
LOSS = ("aten::embedding", "aten::embedding_dense_backward", "aten::_log_softmax", "aten::nll_loss", "aten::index")


def category(name: str, shapes: list, rank: int) -> str:
    if name in MATMULS:
        dims = {d for s in shapes for d in (s or [])}
        return "LoRA matmuls" if rank in dims else "base matmuls"
    if "attention" in name or "flash" in name:
        return "attention"
    if name in CASTS:
        return "casts and copies"
    if "adam" in name.lower() or "foreach" in name or name.startswith("Optimizer"):
        return "optimizer"
    if name in LOSS or "nll_loss" in name or "log_softmax" in name or "embedding" in name:
        return "embedding and loss"
    if name in ELEMENTWISE or name.endswith("_backward") or "norm" in name:
        return "elementwise and norms"
    return "other operators"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--set", action="append", default=[], help="extra config overrides, KEY=VALUE")
    p.add_argument("--tag", default="")
    p.add_argument("--work", default=str(HERE / ".work"))
    args = p.parse_args()
    reexec_with_tcmalloc([sys.executable, *sys.argv])  # the allocator `phitune train` runs with

    from phitune.config import load_config
    from phitune.data.batching import epoch_batches
    from phitune.training.sft import setup, train_step

    work = Path(args.work)
    data = dictionary_chat(work / "dictionary-chat.jsonl", rows=args.batch_size * (args.warmup + args.steps))
    out = work / "profile-run"
    sets = [*lora_sets(data, out, batch_size=args.batch_size, precision=args.precision, r=args.r), *args.set]
    cfg = load_config(None, sets)
    run = setup(cfg, resume=False, overwrite=True)
    examples = run.data.train_examples
    batches = epoch_batches([len(e.input_ids) for e in examples], args.batch_size, 0, 0)
    run.engine.model.train()
    for b in batches[: args.warmup]:
        train_step(run, [examples[i] for i in b])
    timed = batches[args.warmup : args.warmup + args.steps]
    tokens = sum(len(examples[i].input_ids) for b in timed for i in b)

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        started = time.perf_counter()
        for b in timed:
            train_step(run, [examples[i] for i in b])
        wall = time.perf_counter() - started

    per_category: dict[str, float] = defaultdict(float)
    per_op: dict[tuple[str, str], float] = defaultdict(float)
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.self_cpu_time_total <= 0:
            continue
        cat = category(evt.key, evt.input_shapes or [], args.r)
        seconds = evt.self_cpu_time_total / 1e6
        per_category[cat] += seconds
        per_op[(cat, evt.key)] += seconds
    operators = sum(per_category.values())
    per_category["Python and framework overhead"] = max(wall - operators, 0.0)
    write(args, cfg, wall, tokens, len(timed), per_category, per_op)


def write(args, cfg, wall: float, tokens: int, steps: int, per_category: dict, per_op: dict) -> None:
    lines = [
        f"phitune LoRA r={args.r} all-linear on SmolLM2-135M-Instruct, precision {args.precision}, batch "
        f"{args.batch_size} dictionary chat rows ({tokens / steps / args.batch_size:.0f} tokens per row on average), "
        f"{torch.get_num_threads()} threads, {steps} profiled steps after {args.warmup} warm-up steps: "
        f"{wall / steps:.2f} s per step, {tokens / wall:.0f} tokens/s (under the profiler, which slows it a little).",
        "",
        f"Machine: {cpu()}; allocator {in_use()}.",
        "",
        "| where the step's time goes | s per step | share |",
        "| --- | ---: | ---: |",
    ]
    for cat in (*CATEGORIES, "Python and framework overhead"):
        lines.append(f"| {cat} | {per_category.get(cat, 0.0) / steps:.3f} | {per_category.get(cat, 0.0) / wall:.1%} |")
    lines += ["", "Largest operators (self time):", "", "| operator | category | s per step | share |"]
    lines.append("| --- | --- | ---: | ---: |")
    for (cat, name), seconds in sorted(per_op.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"| `{name}` | {cat} | {seconds / steps:.3f} | {seconds / wall:.1%} |")
    table = "\n".join(lines)
    print(table)
    name = "profile_step" + (f"_{args.tag}" if args.tag else "")
    (HERE / "results" / f"{name}.md").write_text(
        f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`\n\n" + table + "\n"
    )
    raw = {
        "args": vars(args),
        "wall_s": wall,
        "steps": steps,
        "tokens": tokens,
        "categories_s": dict(per_category),
        "operators_s": {f"{c}|{n}": s for (c, n), s in per_op.items()},
    }
    (HERE / "results" / f"{name}.json").write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    main()
