"""A job's request -> a phitune training config (the same strict schema as the CLI), and the
"auto" hyperparameters chosen from the dataset size.

The server builds every path and trust decision itself; a tenant's options (`serve/options.py`)
only fill in training choices. `build_config` checks the result once more against the server's
own values before anything runs, whatever the job row holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from phitune.errors import PhituneError
from phitune.serve.errors import validation_message
from phitune.serve.options import tenant_options
from phitune.serve.settings import Settings
from phitune.training import hyperparameters as auto

if TYPE_CHECKING:
    from phitune.config import Config
    from phitune.serve.db import Job


def merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        into[k] = merge(dict(into.get(k) or {}), v) if isinstance(v, dict) and isinstance(into.get(k), dict) else v
    return into


def choose_hyperparameters(asked: dict, n_examples: int) -> dict:
    """OpenAI's `auto` by phitune's own rules (the ones `phitune train` uses): the batch size and
    epochs from the example count; a learning-rate multiplier of 1 means phitune's auto rate."""
    batch = auto.auto_batch_size(n_examples) if asked.get("batch_size", "auto") == "auto" else asked["batch_size"]
    epochs = auto.auto_epochs(n_examples, None, batch) if asked.get("n_epochs", "auto") == "auto" else asked["n_epochs"]
    out = {
        "n_epochs": epochs if not float(epochs).is_integer() else int(epochs),
        "batch_size": batch,
        "learning_rate_multiplier": 1.0
        if asked.get("learning_rate_multiplier", "auto") == "auto"
        else asked["learning_rate_multiplier"],
    }
    if "beta" in asked:
        out["beta"] = 0.1 if asked["beta"] == "auto" else asked["beta"]
    return out


def base_learning_rate(settings: Settings, job: Job, method: str) -> float:
    """What a multiplier of 1.0 means for this job: phitune's auto rate for the served model."""
    width = auto.model_width(settings.models[job.model], trust_remote_code=job.model in settings.trusted)
    return auto.auto_learning_rate(width, method, "dpo" if job.method.get("type") == "dpo" else "sft")


def options(job: Job) -> dict:
    """The job's phitune options, checked against the allow-list again (a row may predate it)."""
    try:
        return tenant_options(job.phitune)
    except ValidationError as exc:
        raise PhituneError(
            validation_message([{**e, "loc": ("body", "phitune", *e["loc"])} for e in exc.errors()])[1]
        ) from None


def server_owned(settings: Settings, job: Job) -> dict:
    """The config keys only the server sets, for this job."""
    return {
        "model": {"name_or_path": settings.models[job.model], "trust_remote_code": job.model in settings.trusted},
        "data": {
            "train": str(settings.file_path(job.training_file)),
            "validation": str(settings.file_path(job.validation_file)) if job.validation_file else None,
        },
        "output_dir": str(settings.run_dir(job.id)),
    }


def raw_config(settings: Settings, job: Job, hyper: dict) -> dict:
    asked = options(job)
    method = asked.get("method", {}).get("name", "lora")
    owned = server_owned(settings, job)
    # phitune's auto rate, scaled: computed once (it reads the served model's config).
    auto_rate = base_learning_rate(settings, job, method) * hyper["learning_rate_multiplier"]
    raw = {
        "model": owned["model"],
        "method": {"name": "lora"},
        "data": {"train": owned["data"]["train"], "format": "auto"},
        "training": {
            "epochs": hyper["n_epochs"],
            "batch_size": hyper["batch_size"],
            "seed": job.seed,
            "learning_rate": auto_rate,
            "log_every": 1,
            "save_every": 10,
            "save_total_limit": settings.keep_checkpoints or None,
        },
        "output_dir": owned["output_dir"],
    }
    if job.validation_file:
        raw["data"]["validation"] = owned["data"]["validation"]
        raw["training"] |= {"eval_every": 10, "keep_best": True}  # the best survives the rotation
    if job.method.get("type") == "dpo":
        raw["method"] |= {"objective": "dpo", "beta": hyper.get("beta", 0.1)}
    raw = merge(raw, asked)
    lr = asked.get("training", {}).get("learning_rate")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):  # the tenant's rate is what the multiplier scales
        raw["training"]["learning_rate"] = lr * hyper["learning_rate_multiplier"]
    elif lr == "auto":  # phitune's auto rate, scaled as when no rate is given
        raw["training"]["learning_rate"] = auto_rate
    return raw


def build_config(settings: Settings, job: Job, hyper: dict) -> Config:
    """The checked config a job runs with; a PhituneError if it cannot run (or if anything the
    server owns came out different from what the server set)."""
    from phitune.config import DistributedConfig, flatten, parse_config

    cfg = parse_config(raw_config(settings, job, hyper), source="job")
    found = flatten(cfg.model_dump(mode="json"))
    expected = flatten(server_owned(settings, job)) | {"model.tokenizer": None, "model.revision": None}
    expected |= flatten({"distributed": DistributedConfig().model_dump(mode="json")})
    wrong = sorted(key for key, value in expected.items() if found.get(key) != value)
    if wrong:
        raise PhituneError(f"job {job.id}: {', '.join(wrong)} differ from what the server sets; the job is refused")
    return cfg


def fine_tuned_name(job: Job, org: str) -> str:
    return f"ft:{job.model}:{org}:{job.suffix or ''}:{job.id.split('-', 1)[1][:8]}"
