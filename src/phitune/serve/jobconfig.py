"""A job's request -> a phitune training config (the same strict schema as the CLI), and the
"auto" hyperparameters chosen from the dataset size."""

from __future__ import annotations

import math

from phitune.serve.settings import Settings

BASE_LR = {"full": 2e-5}  # the learning rate a multiplier of 1.0 means; adapters: 2e-4


def merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        into[k] = merge(dict(into.get(k) or {}), v) if isinstance(v, dict) and isinstance(into.get(k), dict) else v
    return into


def choose_hyperparameters(asked: dict, n_examples: int) -> dict:
    """OpenAI-style "auto": small sets get more epochs and small batches, large ones fewer and larger."""
    n = max(n_examples, 1)
    auto = {"n_epochs": min(10, max(1, round(800 / n))),
            "batch_size": min(32, 2 ** int(math.log2(max(1, n // 16)))),
            "learning_rate_multiplier": 1.0}
    out = {k: (auto[k] if asked.get(k, "auto") == "auto" else asked[k]) for k in auto}
    if "beta" in asked:
        out["beta"] = 0.1 if asked["beta"] == "auto" else asked["beta"]
    return out


def raw_config(settings: Settings, job, hyper: dict) -> dict:
    method = (job.phitune or {}).get("method", {}).get("name", "lora")
    raw = {"model": settings.models[job.model],
           "method": {"name": "lora"},
           "data": {"train": str(settings.file_path(job.training_file)), "format": "auto"},
           "training": {"epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"], "seed": job.seed,
                        "learning_rate": BASE_LR.get(method, 2e-4) * hyper["learning_rate_multiplier"],
                        "log_every": 1, "save_every": 10, "save_total_limit": None},
           "output_dir": str(settings.run_dir(job.id))}
    if job.validation_file:
        raw["data"]["validation"] = str(settings.file_path(job.validation_file))
        raw["training"]["eval_every"] = 10
    if job.method.get("type") == "dpo":
        raw["method"] |= {"objective": "dpo", "beta": hyper.get("beta", 0.1)}
    raw = merge(raw, dict(job.phitune or {}))
    lr = (job.phitune or {}).get("training", {}).get("learning_rate")
    if lr is not None:  # phitune's own learning rate is the base the multiplier scales
        raw["training"]["learning_rate"] = lr * hyper["learning_rate_multiplier"]
    return raw


def build_config(settings: Settings, job, hyper: dict):
    from phitune.config import parse_config

    return parse_config(raw_config(settings, job, hyper))


def fine_tuned_name(job, org: str) -> str:
    return f"ft:{job.model}:{org}:{job.suffix or ''}:{job.id.split('-', 1)[1][:8]}"
