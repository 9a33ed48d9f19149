"""Peak memory per process for full fine-tuning of a ~115M-parameter Phi-3 with 2 processes:
DDP vs ZeRO-2 vs ZeRO-3 vs ZeRO-3 + CPU offload vs FSDP2. Runs `phitune train --nproc 2` for each and reads
`peak_memory_per_process` (VmHWM of each worker) from run.json.

Twice: with glibc's default allocator settings, and with a fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0) under which freed large blocks go back
to the system, so the peak follows live memory more closely than the allocator's retention.

    python benchmarks/distributed_memory.py [--steps 6]   # writes benchmarks/results/distributed_memory.{md,json}
    python benchmarks/distributed_memory.py --breakdown   # where each strategy's memory is: ..._breakdown.{md,json}

The breakdown runs phitune's setup and train_step under torchrun (benchmarks/_memory_census.py)
and reads, per process, the live tensors by owner and the RSS peak inside each part of a step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "DDP": ["--set", "distributed.strategy=ddp"],
    "ZeRO-2": ["--set", "distributed.strategy=deepspeed", "--set", "distributed.zero_stage=2"],
    "ZeRO-3": ["--set", "distributed.strategy=deepspeed", "--set", "distributed.zero_stage=3"],
    "ZeRO-3 + offload": [
        "--set",
        "distributed.strategy=deepspeed",
        "--set",
        "distributed.zero_stage=3",
        "--set",
        "distributed.offload_params=cpu",
        "--set",
        "distributed.offload_optimizer=cpu",
    ],
    "FSDP2": ["--set", "distributed.strategy=fsdp"],
}


def build_model(root: Path) -> tuple[Path, int]:
    """A ~113M Phi-3 (hidden 768, 12 layers) with the tokenizer of `create-model`'s tiny preset."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from phitune.create_model import create_model

    tiny = root / "tiny"
    create_model(tiny, "phi3", "tiny")
    config = AutoConfig.from_pretrained(tiny)
    config.update(
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 12,
            "intermediate_size": 3072,
        }
    )
    model = AutoModelForCausalLM.from_config(config)
    out = root / "phi3-113m"
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--breakdown", action="store_true", help="live tensors by owner and peaks by phase instead")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="phitune-dist-mem-"))
    model, n_params = build_model(work)
    cfg = work / "full.json"
    cfg.write_text(
        json.dumps(
            {
                "model": str(model),
                "method": "full",
                "data": {"train": str(REPO / "examples/data/support_train.jsonl"), "max_length": 256},
                "training": {
                    "max_steps": args.steps,
                    "batch_size": 4,
                    "learning_rate": 1e-5,
                    "precision": "fp32",
                    "log_every": 1,
                },
                "output_dir": str(work / "out"),
            }
        )
    )
    name = "distributed_memory_breakdown" if args.breakdown else "distributed_memory"
    tables, everything = [], []
    for allocator, env in (("glibc defaults", {}), ("MALLOC_MMAP_THRESHOLD_=65536", MALLOC_ENV)):
        if args.breakdown:
            rows = [census(cfg, work, env, strategy) for strategy in ("DDP", "ZeRO-3", "ZeRO-3 + offload", "FSDP2")]
            everything.append({"allocator": allocator, "rows": rows})
            tables.append(breakdown_table(rows, n_params, allocator))
            print(tables[-1], flush=True)
            continue
        rows = run_all(cfg, work, env)
        everything.append({"allocator": allocator, "rows": rows})
        tables.append(table(rows, n_params, args.steps, allocator))
        print(tables[-1], flush=True)
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    command = f"Command: `python benchmarks/distributed_memory.py {' '.join(sys.argv[1:])}`\n\n"
    (results / f"{name}.md").write_text(command + "\n\n".join(tables) + "\n")
    (results / f"{name}.json").write_text(json.dumps({"parameters": n_params, "runs": everything}, indent=2) + "\n")


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_all(cfg: Path, work: Path, env: dict) -> list[dict]:
    import os

    rows = []
    for name, flags in STRATEGIES.items():
        out = work / name.replace(" ", "").replace("+", "-")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "phitune",
                "train",
                str(cfg),
                "--nproc",
                "2",
                "--set",
                f"output_dir={out}",
                "--overwrite",
                *flags,
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, **env),
        )
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        run = json.loads((out / "run.json").read_text())
        peaks = [p["rss_mb"] for p in run["peak_memory_per_process"]]
        rows.append(
            {
                "strategy": name,
                "peak_rss_mb": peaks,
                "max_peak_rss_mb": max(peaks),
                "seconds": run["elapsed_s"],
                "final_loss": run["final_train_loss"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def census(cfg: Path, work: Path, env: dict, strategy: str) -> dict:
    """benchmarks/_memory_census.py under torchrun, 2 processes: rank 0's report."""
    import os

    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *(str(REPO / "benchmarks" / "_memory_census.py"), str(cfg), "--set", f"output_dir={work / 'census'}"),
            *STRATEGIES[strategy],
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
    )
    reports = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("CENSUS ")]
    if proc.returncode or not reports:
        raise SystemExit(f"{strategy} census failed:\n{proc.stderr[-3000:]}")
    report = min(reports, key=lambda r: r["rank"])
    print(strategy, json.dumps(report["peak_rss_within_step"]), flush=True)
    return {"strategy": strategy, **report}


# Owners of the live tensors, as _memory_census.py names them, in the table's columns.
OWNERS = {
    "parameters (whole, or FSDP2's shards)": ("parameters (local)",),
    "ZeRO-3 parameter shards": ("parameter shards (ZeRO-3 ds_tensor)",),
    "DeepSpeed fp32 master shards": ("DeepSpeed optimizer .fp32_partitioned_groups_flat",),
    "DeepSpeed gradient shards": ("DeepSpeed optimizer ._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",),
    "optimizer state": ("optimizer state",),
}


def breakdown_table(rows: list[dict], n_params: int, allocator: str) -> str:
    """Live tensors after the third step by owner, RSS then, the RSS peak in each part of the
    steps (the worst of steps 2 and 3: step 1 also creates the optimizer state), and while the
    final model is saved."""
    ddp = max(max(s.values()) for s in rows[0]["peak_rss_within_step"][1:])
    lines = [
        f"Full fine-tuning, {n_params / 1e6:.0f}M-parameter Phi-3, fp32 + AdamW, 2 processes (gloo), rank 0; "
        f"allocator: {allocator}. MB.",
        "",
        "| strategy | " + " | ".join(OWNERS) + " | other live tensors | all live tensors | RSS between steps "
        "| peak in forward | peak in backward | peak in optimizer step | peak vs DDP | peak saving the model |",
        "| --- |" + " ---: |" * (len(OWNERS) + 8),
    ]
    for r in rows:
        rest = r["phases"][-1]
        owned = [sum(rest.get(k, 0.0) for k in keys) for keys in OWNERS.values()]
        other = sum(
            v for k, v in rest.items() if k.startswith("DeepSpeed") and not any(k in ks for ks in OWNERS.values())
        )
        peaks = {part: max(s[part] for s in r["peak_rss_within_step"][1:]) for part in r["peak_rss_within_step"][0]}
        cells = [*owned, rest.get("other live tensors", 0.0) + other, rest["all live tensors"], rest["rss_mb"]]
        cells += [peaks["forward"], peaks["backward"], peaks["optimizer step"]]
        lines.append(
            f"| {r['strategy']} | " + " | ".join(f"{c:,.0f}" for c in cells) + f" | {max(peaks.values()) / ddp:.0%} "
            f"| {r['peak_rss_saving']:,.0f} |"
        )
    return "\n".join(lines)


def table(rows: list[dict], n_params: int, steps: int, allocator: str) -> str:
    ddp = rows[0]["max_peak_rss_mb"]
    lines = [
        f"Full fine-tuning, {n_params / 1e6:.0f}M-parameter Phi-3, fp32 weights + AdamW, 2 processes on one CPU "
        f"(gloo), batch 4, {steps} steps; allocator: {allocator}.",
        "",
        "| strategy | peak RSS per process (MB) | vs DDP | train time (s) | final loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {' / '.join(f'{p:,.0f}' for p in r['peak_rss_mb'])} | "
            f"{r['max_peak_rss_mb'] / ddp:.0%} | {r['seconds']:.1f} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
