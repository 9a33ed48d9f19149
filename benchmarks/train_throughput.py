"""phitune vs TRL SFTTrainer + PEFT LoRA, side by side in one invocation.

    python benchmarks/train_throughput.py                          # real model, short dictionary rows
    python benchmarks/train_throughput.py --data longtail          # real model, long-tailed chat
    python benchmarks/train_throughput.py --model small --data longtail --tag toy   # ~29M random Phi-3
    python benchmarks/train_throughput.py --model medium --qlora-memory             # + QLoRA vs LoRA memory

The headline is the real model (SmolLM2-135M-Instruct, `make real-model`). Both sides get the same
file (benchmarks/real_data.py: English-German dictionary pairs as chat turns; or long-tailed chat),
the same LoRA (r=16, alpha=32, no dropout as in PEFT's LoraConfig default, all-linear), lr 2e-4, one
epoch, each run in its own process, one after the other. TRL is tried as a user would tune it:
defaults (activation checkpointing on), checkpointing off, bf16 (where the CPU has native bf16),
packing and padding-free. TRL needs `pip install trl datasets` (not a phitune dependency).

Columns: real (non-pad) tokens per second of training-loop time; whole-process wall time
(imports, loading, tokenising, training, saving) and start-up (process start to the first step);
peak RSS; model FLOPs utilisation = useful FLOPs / training time / the matmul peak measured in this
run for the precision that is native here, with useful FLOPs = 4 x (decoder linear-layer
parameters) per real token (forward + input gradients; frozen weights get no weight gradient),
4 x (head parameters) per labelled token, and attention (3 x the forward's
4 x layers x d_model x position); held-out loss of the saved adapter, computed by
the same code for every run. Writes benchmarks/results/train_throughput[_TAG].{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _machine import cpu  # noqa: E402
from longtail_data import write as write_data  # noqa: E402
from real_data import REAL_MODEL, dictionary_chat  # noqa: E402

from phitune.hardware import cpu_has_native_bf16  # noqa: E402
from phitune.training.allocator import tcmalloc  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10, trials: int = 5) -> float:
    """Best of several timed trials: the physical limit, not a noisy moment of this shared machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def useful_flops(model_dir: Path, lengths: list[int], labelled: int, full: bool = False) -> float:
    """Model FLOPs a LoRA step needs for these examples: 4 x (decoder linear-layer parameters) per
    real token (forward, and the input gradients the frozen weights pass back), the output head
    4 x its parameters per labelled token only (no other position needs logits), and attention
    (3 x the forward's 4 x layers x d_model x position). Full fine-tuning (`full`) adds the weight
    gradients: 6 x instead of 4 x for the linear layers and the head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    layers, d = config.num_hidden_layers, config.hidden_size
    attention_fwd = sum(4 * layers * d * n * (n + 1) / 2 for n in lengths)
    per = 6 if full else 4
    return per * linear * sum(lengths) + per * head.weight.numel() * labelled + 3 * attention_fwd


def run_child(cmd: list[str], log: Path) -> dict:
    """The child's own JSON line, plus the whole process's wall time and its start-up (process
    start to the first training step)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.time() - started
    if "train_start" in out:
        out["startup_seconds"] = out["train_start"] - started
    return out


def heldout_loss(model_dir: Path, out: Path, val: Path, max_length: int) -> float:
    """Loss on the held-out rows of the run's adapter (or, for full fine-tuning, its whole model)."""
    from phitune.data.dataset import tokenize_file
    from phitune.evaluate.lm import lm_metrics
    from phitune.models import load_for_inference

    if (out / "adapter").is_dir():
        model, tok = load_for_inference(str(model_dir), str(out / "adapter"), device="cpu")
    else:
        model, tok = load_for_inference(str(out / "model"), device="cpu")
    examples = tokenize_file(tok, val, max_length).examples
    return lm_metrics(model, examples, batch_size=8, pad_id=tok.pad_token_id, device="cpu")["loss"]


def phitune_cmd(model: Path, data: Path, out: Path, args, precision: str) -> list[str]:
    sets = {
        "model.name_or_path": model,
        "data.train": data,
        "data.max_length": args.max_length,
        "method.name": "lora",
        "method.r": 16,
        "method.alpha": 32,
        "method.dropout": 0.0,
        "training.epochs": 1,
        "training.batch_size": args.batch_size,
        "training.learning_rate": 2e-4,
        "training.precision": precision,
        "training.seed": 0,
        "training.tensorboard": "off",
        "output_dir": out,
    }
    return phitune_child([f"{k}={v}" for k, v in sets.items()])


def compile_cache(work: Path) -> Path:
    """Where the compiled runs keep Inductor's cache (emptied before a `-cold` run)."""
    return Path(work) / "compile-cache"


def compiled_cmd(model: Path, data: Path, out: Path, args) -> list[str]:
    """training.compile true, with the compile cache in the work directory: the first compiled
    run pays the whole compile, the next one what the cache leaves."""
    cmd = phitune_cmd(model, data, out, args, "auto") + ["--set", "training.compile=true"]
    return ["env", f"TORCHINDUCTOR_CACHE_DIR={compile_cache(args.work)}", *cmd]


def under_tcmalloc(cmd: list[str]) -> list[str]:
    """CMD with tcmalloc preloaded; without tcmalloc installed the run is reported as failed,
    not run under glibc under a tcmalloc label."""
    library = tcmalloc()
    if library is None:
        raise SystemExit("tcmalloc is not installed (apt install libtcmalloc-minimal4)")
    return ["env", f"LD_PRELOAD={library}", *cmd]


def packed_sets(args) -> list[str]:
    """Packed rows holding about as many real tokens per step as `batch_size` examples do (so the
    optimizer takes about as many steps), each row at least as long as the longest example."""
    per_step = args.batch_size * sum(args.lengths) / len(args.lengths)
    rows = max(1, round(per_step / args.max_length))
    length = max(max(args.lengths), math.ceil(per_step / rows))
    sets = {"data.packing": "on", "training.batch_size": rows, "data.max_length": length}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def phitune_child(sets: list[str]) -> list[str]:
    """`phitune train --overwrite --set KEY=VALUE ...` in a child that reports time and memory."""
    return [sys.executable, str(HERE / "_phitune_child.py"), "--overwrite", *[x for s in sets for x in ("--set", s)]]


def trl_cmd(model: Path, data: Path, out: Path, args, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "_trl_child.py"),
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        *extra,
    ]


# name -> (label, needs native bf16, command(model, data, out, args))
RUNS = {
    "phitune": (
        "phitune LoRA, precision auto",
        False,
        lambda m, d, o, a: phitune_cmd(m, d, o, a, "auto"),
    ),
    "phitune-bf16": ("phitune LoRA, bf16 autocast", True, lambda m, d, o, a: phitune_cmd(m, d, o, a, "bf16")),
    "phitune-fp32": ("phitune LoRA, fp32", False, lambda m, d, o, a: phitune_cmd(m, d, o, a, "fp32")),
    "phitune-unfused": (
        "phitune LoRA, precision auto, PEFT's own LoRA layer (method.fused false)",
        False,
        lambda m, d, o, a: phitune_cmd(m, d, o, a, "auto") + ["--set", "method.fused=false"],
    ),
    "phitune-dropout": (
        "phitune LoRA, precision auto, LoRA dropout 0.05 (phitune's default)",
        False,
        lambda m, d, o, a: phitune_cmd(m, d, o, a, "auto") + ["--set", "method.dropout=0.05"],
    ),
    "phitune-qlora": (
        "phitune QLoRA (NF4 base, double quant, fp32 compute), precision auto",
        False,
        lambda m, d, o, a: phitune_cmd(m, d, o, a, "auto") + ["--set", "method.name=qlora"],
    ),
    "phitune-full": (
        "phitune full fine-tuning (lr 2e-5), precision auto",
        False,
        lambda m, d, o, a: (
            phitune_cmd(m, d, o, a, "auto") + ["--set", "method.name=full", "--set", "training.learning_rate=2e-5"]
        ),
    ),
    "phitune-sdpa": (
        "phitune LoRA, precision auto, SDPA attention (model.attn_implementation sdpa: before short-row attention)",
        False,
        lambda m, d, o, a: phitune_cmd(m, d, o, a, "auto") + ["--set", "model.attn_implementation=sdpa"],
    ),
    "phitune-compiled-cold": (
        "phitune LoRA, precision auto, training.compile true, empty compile cache",
        False,
        lambda m, d, o, a: compiled_cmd(m, d, o, a),
    ),
    "phitune-compiled": (
        "phitune LoRA, precision auto, training.compile true, compile cache from the run before",
        False,
        lambda m, d, o, a: compiled_cmd(m, d, o, a),
    ),
    "phitune-packing": (
        "phitune LoRA, precision auto, packing with isolation (block-diagonal attention)",
        False,
        lambda m, d, o, a: phitune_cmd(m, d, o, a, "auto") + packed_sets(a),
    ),
    "trl": (
        "TRL SFTTrainer + PEFT, defaults (fp32, activation checkpointing on)",
        False,
        lambda m, d, o, a: trl_cmd(m, d, o, a),
    ),
    "trl-no-gc": (
        "TRL, checkpointing off",
        False,
        lambda m, d, o, a: trl_cmd(m, d, o, a, "--no-gradient-checkpointing"),
    ),
    "trl-bf16": (
        "TRL, bf16, checkpointing off",
        True,
        lambda m, d, o, a: trl_cmd(m, d, o, a, "--bf16", "--no-gradient-checkpointing"),
    ),
    "trl-bf16-tcmalloc": (
        "TRL, bf16, checkpointing off, under tcmalloc (LD_PRELOAD, as phitune train runs)",
        True,
        lambda m, d, o, a: under_tcmalloc(trl_cmd(m, d, o, a, "--bf16", "--no-gradient-checkpointing")),
    ),
    "phitune-glibc": (
        "phitune LoRA, precision auto, glibc's allocator (PHITUNE_ALLOCATOR=system)",
        False,
        lambda m, d, o, a: ["env", "PHITUNE_ALLOCATOR=system", *phitune_cmd(m, d, o, a, "auto")],
    ),
    "trl-dropout": (
        "TRL, checkpointing off, LoRA dropout 0.05",
        False,
        lambda m, d, o, a: trl_cmd(m, d, o, a, "--no-gradient-checkpointing", "--dropout", "0.05"),
    ),
    "trl-bf16-dropout": (
        "TRL, bf16, checkpointing off, LoRA dropout 0.05",
        True,
        lambda m, d, o, a: trl_cmd(m, d, o, a, "--bf16", "--no-gradient-checkpointing", "--dropout", "0.05"),
    ),
    "trl-packing": (
        "TRL, packing, checkpointing off",
        False,
        lambda m, d, o, a: trl_cmd(m, d, o, a, "--packing", "--no-gradient-checkpointing"),
    ),
    "trl-padding-free": (
        "TRL, padding-free, checkpointing off",
        False,
        lambda m, d, o, a: trl_cmd(m, d, o, a, "--padding-free", "--no-gradient-checkpointing"),
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(HERE / ".work"))
    p.add_argument(
        "--model",
        default="real",
        help="real: SmolLM2-135M-Instruct (make real-model); or a create-model preset (tiny, small, medium)",
    )
    p.add_argument(
        "--data",
        default="dictionary",
        choices=["dictionary", "longtail"],
        help="dictionary: short real rows (English-German pairs as chat turns); longtail: long-tailed chat",
    )
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument(
        "--runs",
        default="phitune,phitune-unfused,phitune-bf16,trl,trl-no-gc,trl-bf16,trl-packing,trl-padding-free",
        help="comma-separated subset of: " + ", ".join(RUNS),
    )
    p.add_argument(
        "--loss-seeds",
        type=int,
        default=1,
        help="held-out loss of phitune over this many seeds, to show the seed-to-seed spread",
    )
    p.add_argument(
        "--qlora-memory", action="store_true", help="also compare QLoRA and LoRA-bf16 peak memory on the medium preset"
    )
    p.add_argument("--tag", default="", help="results go to train_throughput[_TAG].{md,json}")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from phitune.data.dataset import tokenize_file

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data, val = model_and_data(work, args)
    tok = AutoTokenizer.from_pretrained(model)
    examples = tokenize_file(tok, data, args.max_length).examples
    lengths = [len(e.input_ids) for e in examples]
    args.lengths = lengths  # what packed runs size their rows by
    labelled = sum(sum(label != -100 for label in e.labels) for e in examples)
    flops = {full: useful_flops(model, lengths, labelled, full) for full in (False, True)}
    native_bf16 = cpu_has_native_bf16()
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16) if native_bf16 else None}

    results, skipped = [], []
    for name in filter(None, args.runs.split(",")):
        label, needs_bf16, cmd = RUNS[name]
        if needs_bf16 and not native_bf16:
            skipped.append(f"{label}: skipped, this CPU has no native bf16 matmul (AVX512-BF16 or AMX)")
            continue
        out = work / f"run-{name}"
        if name.endswith("-cold"):
            shutil.rmtree(compile_cache(work), ignore_errors=True)
        print(f"running {label} ...", file=sys.stderr, flush=True)
        try:
            r = run_child(cmd(model, data, out, args), work / f"{name}.log")
        except SystemExit as exc:  # one configuration that does not run is a row of the table, not the end
            skipped.append(f"{label}: failed ({exc})")
            continue
        r["tokens_per_second"] = r["real_tokens"] / r["train_seconds"]
        r["step_seconds"] = r["train_seconds"] / r["steps"]
        r["heldout_loss"] = heldout_loss(model, out, val, args.max_length)
        results.append({"run": name, "label": label, **r})

    # Measured again after the runs, the best of both: MFU is then never flattered by a slow moment.
    peak["fp32"] = max(peak["fp32"], matmul_peak(torch.float32))
    if native_bf16:
        peak["bf16"] = max(peak["bf16"], matmul_peak(torch.bfloat16))
    for r in results:
        r["mfu"] = flops[r["run"] == "phitune-full"] / r["train_seconds"] / 1e9 / (peak["bf16"] or peak["fp32"])
    trl = [r for r in results if r["run"].startswith("trl")]
    fastest = max(trl, key=lambda r: r["tokens_per_second"], default=None)
    lines = [describe(model, args, lengths, peak), ""]
    lines += [
        f"| run | real tokens/s | vs fastest TRL | whole process (s) | vs fastest TRL | start-up (s) | peak RSS (MB) "
        f"| MFU (of {'bf16' if native_bf16 else 'fp32'} peak) | held-out loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        tps = f"{r['tokens_per_second'] / fastest['tokens_per_second']:.2f}x" if fastest else "-"
        wall = f"{fastest['process_seconds'] / r['process_seconds']:.2f}x" if fastest else "-"
        lines.append(
            f"| {r['label']} | {r['tokens_per_second']:.0f} | {tps} | {r['process_seconds']:.0f} | {wall} | "
            f"{r.get('startup_seconds', float('nan')):.1f} | {r['peak_rss_mb']:.0f} | {r['mfu']:.1%} | "
            f"{r['heldout_loss']:.4f} |"
        )
    lines += [f"- {line}" for line in skipped]
    if args.loss_seeds > 1:
        lines += ["", seed_spread(model, data, val, work, args, results)]
    if args.qlora_memory:
        lines += ["", *qlora_memory(work, args)]
    table = "\n".join(lines)
    print(table)
    name = "train_throughput" + (f"_{args.tag}" if args.tag else "")
    command = f"Command: `python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`\n\n"
    (HERE / "results" / f"{name}.md").write_text(command + table + "\n")
    (HERE / "results" / f"{name}.json").write_text(json.dumps({"peak": peak, "runs": results}, indent=2) + "\n")


def model_and_data(work: Path, args) -> tuple[Path, Path, Path]:
    """(model directory, training file, held-out file) for --model and --data."""
    from phitune.create_model import create_model

    if args.model == "real":
        model = REAL_MODEL
        if not (model / "config.json").is_file():
            raise SystemExit(f"{model}: the real model is not imported; run `make real-model`")
    else:
        model = work / f"phi3-{args.model}"
        if not (model / "config.json").is_file():
            create_model(model, "phi3", args.model, overwrite=True)
    if args.data == "dictionary":
        data = dictionary_chat(work / f"dictionary-{args.examples}.jsonl", rows=args.examples)
        val = dictionary_chat(work / "dictionary-val.jsonl", rows=64, split="val")
    else:
        data = write_data(work / "train.jsonl", args.examples, seed=0)
        val = write_data(work / "val.jsonl", 64, seed=1)
    return model, data, val


def describe(model: Path, args, lengths: list[int], peak: dict) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    name = "SmolLM2-135M-Instruct" if args.model == "real" else f"Phi-3 architecture, `{args.model}` preset"
    rows = "dictionary pairs as chat turns" if args.data == "dictionary" else "long-tailed chat examples"
    bf16 = f"bf16 {peak['bf16']:.0f} GFLOP/s" if peak["bf16"] else "bf16: no native support on this CPU"
    return (
        f"Machine: {cpu()}.\n\n"
        f"Model: {name} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary "
        f"{config.vocab_size}). {len(lengths)} {rows} (median {sorted(lengths)[len(lengths) // 2]} tokens, max "
        f"{max(lengths)}), batch {args.batch_size}, max_length {args.max_length}, LoRA r=16 alpha 32 all-linear, "
        f"lr 2e-4, one epoch, {torch.get_num_threads()} threads. Matmul peak measured in this run: fp32 "
        f"{peak['fp32']:.0f} GFLOP/s, {bf16}. MFU counts 4 x (decoder linear-layer parameters) FLOPs per real "
        "token (forward and input gradients; the frozen weights get no weight gradient), 4 x (head parameters) per "
        "labelled token, plus attention."
    )


def seed_spread(model: Path, data: Path, val: Path, work: Path, args, results: list[dict]) -> str:
    """phitune LoRA and TRL without checkpointing (TRL's fastest here) again with other seeds (LoRA
    init, data order): how much held-out loss moves by chance on each side."""

    def phitune_seed(out: Path, seed: int) -> list[str]:
        return phitune_cmd(model, data, out, args, "auto") + ["--set", f"training.seed={seed}"]

    def trl_seed(out: Path, seed: int) -> list[str]:
        return trl_cmd(model, data, out, args, "--no-gradient-checkpointing", "--seed", str(seed))

    lines = []
    for run, label, cmd in (
        ("phitune", "phitune LoRA", phitune_seed),
        ("trl-no-gc", "TRL, checkpointing off", trl_seed),
    ):
        first = next((r for r in results if r["run"] == run), None)
        if first is None:
            continue
        losses = [first["heldout_loss"]]
        for seed in range(1, args.loss_seeds):
            out = work / f"run-{run}-seed{seed}"
            print(f"running {label}, seed {seed} ...", file=sys.stderr, flush=True)
            run_child(cmd(out, seed), work / f"{run}-seed{seed}.log")
            losses.append(heldout_loss(model, out, val, args.max_length))
        mean = sum(losses) / len(losses)
        lines.append(
            f"- {label}, seeds 0-{len(losses) - 1}: held-out loss mean {mean:.4f}, "
            f"range {min(losses):.4f}-{max(losses):.4f} ({', '.join(f'{x:.4f}' for x in losses)})"
        )
    return "Seed-to-seed spread of the held-out loss (LoRA init and data order):\n" + "\n".join(lines)


def qlora_memory(work: Path, args) -> list[str]:
    """Peak RSS of LoRA (bf16 base) and QLoRA (NF4 base) on the medium (~260M) preset, both with
    gradient checkpointing (QLoRA's usual setting), 10 steps of the same batches."""
    from phitune.create_model import create_model

    model = work / "phi3-medium"
    if not (model / "config.json").is_file():
        create_model(model, "phi3", "medium", overwrite=True, dtype="bfloat16")
    data = write_data(work / "longtail-memory.jsonl", args.examples, seed=0)  # long-tailed chat, whatever --data
    baseline = run_child([sys.executable, "-c", IMPORTS_ONLY], work / "mem-imports.log")["peak_rss_mb"]
    rows = [
        f"~260M-parameter Phi-3 (`medium` preset, bf16 checkpoint), batch {args.batch_size}, max_length "
        f"{args.max_length}, gradient checkpointing, 10 steps. Process after imports (torch, transformers, peft, "
        f"bitsandbytes): {baseline:.0f} MB; the columns below subtract it.",
        "",
        "| method | weights in memory (MB) | vs LoRA | peak RSS, whole run (MB) | vs LoRA | peak RSS, training loop "
        "(MB) | vs LoRA |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    measured = {}
    for name, extra in (
        ("LoRA, bf16 base", []),
        ("QLoRA, NF4 + double quant base", ["method.name=qlora", "method.compute_dtype=bfloat16"]),
    ):
        out = work / f"mem-{len(measured)}"
        sets = [
            f"model.name_or_path={model}",
            f"data.train={data}",
            f"data.max_length={args.max_length}",
            "training.max_steps=10",
            f"training.batch_size={args.batch_size}",
            "training.tensorboard=off",
            "training.precision=bf16",
            "training.gradient_checkpointing=true",
            f"output_dir={out}",
            *extra,
        ]
        print(f"running memory: {name} ...", file=sys.stderr, flush=True)
        r = run_child(phitune_child(sets), work / f"mem-{len(measured)}.log")
        measured[name] = (r["weight_memory_mb"], r["peak_rss_mb"] - baseline, r["train_peak_rss_mb"] - baseline)
    lora = next(iter(measured.values()))
    rows += [
        "| " + " | ".join([k] + [f"{v:.0f} | {v / ref:.0%}" for v, ref in zip(values, lora)]) + " |"
        for k, values in measured.items()
    ]
    return rows


IMPORTS_ONLY = (
    f"import json, sys; sys.path.insert(0, {str(HERE)!r}); from _memory import peak_rss_mb; "
    "import torch, transformers, peft, accelerate, bitsandbytes; print(json.dumps({'peak_rss_mb': peak_rss_mb()}))"
)


if __name__ == "__main__":
    main()
