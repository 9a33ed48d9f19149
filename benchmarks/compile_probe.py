"""Does `torch.compile` (inductor, CPU) make phitune's LoRA step faster on the real model?

    python benchmarks/compile_probe.py [--steps 8] [--precision fp32]

Two runs of phitune's own setup and train_step from the same seed, in this process: eager, then
with every decoder layer compiled (`layer.compile(dynamic=True)`: the batches' lengths differ).
Reports the compile cost (the compiled run's first steps against eager's), the steady step time of
each (median of the steps after `--warmup`), and the largest difference between their per-step
losses. SmolLM2-135M-Instruct (`make real-model`), dictionary rows, LoRA r=16 all-linear, batch 16.
Writes benchmarks/results/compile_probe[_TAG].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import cpu  # noqa: E402
from real_data import dictionary_chat, lora_sets  # noqa: E402

from phitune.training.compiling import compile_layers, decoder_parameters  # noqa: E402


def timed_run(sets: list[str], steps: int, compiled: bool) -> dict:
    from phitune.config import load_config
    from phitune.data.batching import epoch_batches
    from phitune.training.sft import setup, train_step

    run = setup(load_config(None, [*sets, "training.compile=false"]), resume=False, overwrite=True)
    if compiled:
        compile_layers(run.engine.unwrap())  # as training.compile does, into an empty cache (below)
    examples = run.data.train_examples
    batches = epoch_batches([len(e.input_ids) for e in examples], run.cfg.training.batch_size, 0, 0)
    run.engine.model.train()
    seconds, losses = [], []
    for b in batches[:steps]:
        start = time.perf_counter()
        losses.append(train_step(run, [examples[i] for i in b]).loss)
        seconds.append(time.perf_counter() - start)
    tokens = sum(len(examples[i].input_ids) for b in batches[:steps] for i in b) / steps
    param_tokens = decoder_parameters(run.engine.unwrap()) * tokens
    return {"seconds": seconds, "losses": losses, "param_tokens_per_step": param_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the steady step time")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tag", default="")
    p.add_argument("--work", default=str(HERE / ".work"))
    args = p.parse_args()

    work = Path(args.work)
    # A cold compile: the cache starts empty (training.compile keeps its own in ~/.cache/phitune/compile).
    cache = Path(tempfile.mkdtemp(prefix="compile-cache-", dir=work if work.is_dir() else None))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    data = dictionary_chat(work / "dictionary-compile.jsonl", rows=args.batch_size * args.steps)
    sets = lora_sets(data, work / "compile-run", batch_size=args.batch_size, precision=args.precision)
    eager = timed_run(sets, args.steps, compiled=False)
    compiled = timed_run(sets, args.steps, compiled=True)
    steady = {k: statistics.median(r["seconds"][args.warmup :]) for k, r in (("eager", eager), ("compiled", compiled))}
    extra = sum(compiled["seconds"][: args.warmup]) - sum(eager["seconds"][: args.warmup])
    diff = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))
    lines = [
        f"SmolLM2-135M-Instruct, LoRA r=16 all-linear, {args.precision}, batch {args.batch_size} dictionary rows, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; every decoder layer "
        "`compile(dynamic=True)` (phitune.training.compiling.compile_layers).",
        "",
        "| | eager | compiled |",
        "| --- | ---: | ---: |",
        f"| first {args.warmup} steps (s) | {sum(eager['seconds'][: args.warmup]):.1f} | "
        f"{sum(compiled['seconds'][: args.warmup]):.1f} |",
        f"| steady step, median of steps {args.warmup + 1}-{args.steps} (s) | {steady['eager']:.2f} | "
        f"{steady['compiled']:.2f} |",
        "",
        f"Compiled / eager steady step time: {steady['compiled'] / steady['eager']:.2f}. Compile cost: {extra:.0f} s, "
        + (
            f"repaid after {extra / (steady['eager'] - steady['compiled']):.0f} steps"
            if steady["compiled"] < steady["eager"]
            else "never repaid (not faster)"
        )
        + f". Largest per-step loss difference: {diff:.2e}.",
        "",
        f"Machine: {cpu()}. Break-even in parameter-tokens (decoder parameters x tokens trained), what "
        "`training.compile: auto` compares with `phitune.training.compiling.REPAYS`: "
        + (
            f"{extra / (steady['eager'] - steady['compiled']) * eager['param_tokens_per_step']:.2e}."
            if steady["compiled"] < steady["eager"]
            else "none."
        ),
    ]
    shutil.rmtree(cache, ignore_errors=True)
    table = "\n".join(lines)
    print(table)
    name = "compile_probe" + (f"_{args.tag}" if args.tag else "")
    command = f"Command: `python benchmarks/compile_probe.py {' '.join(sys.argv[1:])}`\n\n"
    (HERE / "results" / f"{name}.md").write_text(command + table + "\n")
    (HERE / "results" / f"{name}.json").write_text(
        json.dumps({"eager": eager, "compiled": compiled, "steady": steady}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
