"""`phitune kaito`: the same training config as a KAITO fine-tuning job on Kubernetes.

KAITO (kaito-project/kaito) tunes its own model presets with its own trainer (transformers +
TRL's SFTConfig + PEFT), configured by a ConfigMap whose `training_config.yaml` has the sections
ModelConfig, QuantizationConfig, LoraConfig, TrainingArguments, DatasetConfig, DataCollator; the
`Workspace` names the preset, the method (lora | qlora), where the data comes from and where the
adapter goes. We translate a phitune config into both. What KAITO cannot express is refused, all
problems at once, each naming the key and what to do instead; nothing is silently dropped.
Checked against KAITO at commit 056b828 (v0.12): its CRD, tuning templates and webhook rules.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from phitune.errors import PhituneError
from phitune.methods.lora import LoraFamilySettings
from phitune.tasks import TASKS
from phitune.training import hyperparameters

if TYPE_CHECKING:
    from phitune.config import Config

# Hugging Face id -> KAITO preset, for the presets KAITO can tune (TransformerTuningParameters).
PRESETS = {
    "microsoft/phi-4": "phi-4",
    "microsoft/phi-4-mini-instruct": "phi-4-mini-instruct",
    "microsoft/phi-3-mini-4k-instruct": "phi-3-mini-4k-instruct",
    "microsoft/phi-3-mini-128k-instruct": "phi-3-mini-128k-instruct",
    "microsoft/phi-3-medium-4k-instruct": "phi-3-medium-4k-instruct",
    "microsoft/phi-3-medium-128k-instruct": "phi-3-medium-128k-instruct",
    "microsoft/phi-3.5-mini-instruct": "phi-3.5-mini-instruct",
    "mistralai/mistral-7b-v0.3": "mistral-7b-v0.3",
    "qwen/qwen2.5-coder-7b-instruct": "qwen2.5-coder-7b-instruct",
    "qwen/qwen2.5-coder-32b-instruct": "qwen2.5-coder-32b-instruct",
}
# Their hidden sizes (config.json), for the `auto` learning rate without downloading a config.
PRESET_WIDTHS = {
    "phi-4": 5120,
    "phi-4-mini-instruct": 3072,
    "phi-3-mini-4k-instruct": 3072,
    "phi-3-mini-128k-instruct": 3072,
    "phi-3-medium-4k-instruct": 5120,
    "phi-3-medium-128k-instruct": 5120,
    "phi-3.5-mini-instruct": 3072,
    "mistral-7b-v0.3": 4096,
    "qwen2.5-coder-7b-instruct": 3584,
    "qwen2.5-coder-32b-instruct": 5120,
}
DTYPES = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
}
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def preset_for(model: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit if explicit in PRESETS.values() else None
    return PRESETS.get(model.lower())


def untranslatable(cfg: Config, fmt: str) -> list[str]:
    """Every part of the config KAITO's trainer has no setting for."""
    m, d, t, task, dist = cfg.method, cfg.data, cfg.training, cfg.task, cfg.distributed
    out = []
    if not isinstance(m, LoraFamilySettings):
        out.append(f"method.name: {m.name} (KAITO tunes with lora or qlora; DoRA as lora + use_dora)")
    elif m.init != "default":
        out.append(f"method.init: {m.init} (KAITO's LoraConfig takes only the default initialisation)")
    if m.objective != "sft":
        out.append(f"method.objective: {m.objective} (KAITO's trainer is supervised fine-tuning only)")
    if TASKS[task.name].fields:  # a preset writes prompts from the task's columns
        out.append(
            f"task.name: {task.name} (KAITO does not render task prompts; convert the rows to chat messages "
            "or use `phitune k8s`, which runs phitune itself)"
        )
    if fmt not in ("chat", "prompt_completion", "text"):
        out.append(f"data.format: {fmt} (KAITO reads messages, prompt/completion or text columns)")
    if d.validation:
        out.append("data.validation: KAITO takes one input and splits it; use data.validation_split")
    if d.system:
        out.append("data.system: KAITO adds no system message; put it in the rows")
    if not d.chat_template:
        out.append("data.chat_template: false (KAITO always uses the model's chat template)")
    if d.subset < 1.0:
        out.append(f"data.subset: {d.subset} (KAITO trains on the whole input)")
    if dist.strategy in ("deepspeed", "fsdp"):
        out.append(f"distributed.strategy: {dist.strategy} (KAITO launches its own accelerate data-parallel job)")
    if t.early_stopping_patience or t.keep_best or t.best_metric != "auto":
        out.append("training.early_stopping_patience / keep_best / best_metric: KAITO keeps no best checkpoint")
    return out


def kaito_manifests(
    cfg: Config,
    *,
    name: str,
    instance_type: str,
    input_urls: list[str] | None = None,
    input_image: str | None = None,
    output_image: str | None = None,
    push_secret: str | None = None,
    output_volume: str | None = None,
    preset: str | None = None,
) -> tuple[dict, dict]:
    """(Workspace, ConfigMap) for `cfg`, or one PhituneError listing every problem."""
    cfg, chosen, fmt = _checked(cfg, name, input_urls, input_image, output_image, push_secret, output_volume, preset)
    method = "qlora" if cfg.method.name == "qlora" else "lora"
    workspace = {
        "apiVersion": "kaito.sh/v1beta1",
        "kind": "Workspace",
        "metadata": {"name": name},
        "resource": {"instanceType": instance_type, "labelSelector": {"matchLabels": {"app": name}}},
        "tuning": {
            "preset": {"name": chosen},
            "method": method,
            "config": f"{name}-training",
            "input": {"urls": list(input_urls)} if input_urls else {"image": input_image},
            "output": (
                {"image": output_image, "imagePushSecret": push_secret}
                if output_image
                else {"volumeSource": {"persistentVolumeClaim": {"claimName": output_volume}}}
            ),
        },
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-training"},
        "data": {
            "training_config.yaml": yaml.safe_dump({"training_config": training_config(cfg, fmt)}, sort_keys=False)
        },
    }
    return workspace, configmap


def _checked(cfg, name, input_urls, input_image, output_image, push_secret, output_volume, preset):
    """(the config with auto values resolved, the KAITO preset, the data format), or one PhituneError."""
    from phitune.data.formats import detect_format
    from phitune.data.readers import read_rows

    problems = []
    if not DNS_NAME.match(name) or len(name) > 63:
        problems.append(f"--name {name!r}: must be a DNS label (lower-case letters, digits, '-'; at most 63)")
    chosen = preset_for(cfg.model.name_or_path, preset)
    if chosen is None:
        problems.append(
            f"model.name_or_path {cfg.model.name_or_path!r}"
            + (f" / --preset {preset!r}" if preset else "")
            + f": KAITO tunes only its presets ({', '.join(sorted(PRESETS.values()))}); pass --preset "
            "or use `phitune k8s`"
        )
    rows = None
    if Path(cfg.data.train).is_file():
        rows, _ = read_rows(cfg.data.train)
    fmt = cfg.data.format
    if fmt == "auto":
        fmt = detect_format(rows, cfg.data.train) if rows else "chat"
    problems += untranslatable(cfg, fmt)
    cfg, unresolved = hyperparameters.for_manifest(cfg, len(rows) if rows else None, PRESET_WIDTHS.get(chosen or ""))
    problems += unresolved
    if bool(input_urls) + bool(input_image) != 1:
        problems.append(
            "input: give exactly one of --input-url (repeatable) or --input-image; KAITO cannot read "
            f"the local file {cfg.data.train}"
        )
    if bool(output_image) + bool(output_volume) != 1:
        problems.append("output: give exactly one of --output-image (with --push-secret) or --output-pvc")
    if output_image and not push_secret:
        problems.append("--output-image needs --push-secret (the registry secret KAITO pushes the adapter with)")
    if problems:
        raise PhituneError(f"this config cannot run on KAITO ({len(problems)} problem(s))", problems=problems)
    return cfg, chosen, fmt


def training_config(cfg: Config, fmt: str) -> dict:
    m, d, t = cfg.method, cfg.data, cfg.training
    dtype = DTYPES[t.precision]
    dataset: dict[str, Any] = {
        "shuffle_dataset": True,
        "shuffle_seed": t.seed,
        "train_test_split": round(1.0 - d.validation_split, 6),
    }
    dataset |= {
        "chat": {"messages_column": "messages"},
        "prompt_completion": {"context_column": "prompt", "response_column": "completion"},
        "text": {"response_column": "text"},
    }[fmt]
    out = {
        "ModelConfig": {"torch_dtype": dtype, "local_files_only": True, "device_map": "auto"},
        "QuantizationConfig": {"load_in_4bit": False},
        "LoraConfig": _lora_config(m),
        "TrainingArguments": _training_arguments(cfg, fmt, dtype),
        "DataCollator": {"mlm": False},
        "DatasetConfig": dataset,
    }
    if m.name == "qlora":
        compute = {"auto": dtype, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[m.compute_dtype]
        out["QuantizationConfig"] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": m.quant_type,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_use_double_quant": m.double_quant,
        }
    return out


def _lora_config(m) -> dict:
    lora = {
        "r": m.r,
        "lora_alpha": int(m.alpha) if float(m.alpha).is_integer() else m.alpha,
        "lora_dropout": m.dropout,
        "target_modules": m.target_modules,
        "use_rslora": m.use_rslora,
    }
    if m.name == "dora":
        lora["use_dora"] = True
    if m.modules_to_save:
        lora["modules_to_save"] = m.modules_to_save
    return lora


def _training_arguments(cfg, fmt: str, dtype: str) -> dict:
    d, t = cfg.data, cfg.training
    args = {
        "output_dir": "/mnt/results",
        "per_device_train_batch_size": t.batch_size // t.gradient_accumulation_steps,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_steps,
        "warmup_ratio": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm or 0.0,
        "seed": t.seed,
        "optim": OPTIMIZERS[t.optimizer],
        "gradient_checkpointing": t.gradient_checkpointing,
        "logging_steps": t.log_every,
        "max_length": d.max_length,
        "packing": d.packing == "on" or fmt == "text",
        "bf16": dtype == "bfloat16",
        "fp16": dtype == "float16",
        "ddp_find_unused_parameters": False,
    }
    if t.max_steps:
        args["max_steps"] = t.max_steps
    else:
        args["num_train_epochs"] = t.epochs or 1.0
    if t.save_every:
        args |= {"save_strategy": "steps", "save_steps": t.save_every, "save_total_limit": t.save_total_limit}
    else:
        args["save_strategy"] = "no"
    if d.validation_split and t.eval_every:
        args |= {"eval_strategy": "steps", "eval_steps": t.eval_every}
    return args


def kaito_rules(workspace: dict, configmap: dict) -> list[str]:
    """KAITO's admission rules for a tuning Workspace and its ConfigMap (api/v1beta1 webhook
    validation): the method, the quantization it implies, the recognised sections, an output_dir
    under /mnt, exactly one input source."""
    problems = []
    tuning = workspace.get("tuning", {})
    method = str(tuning.get("method", "")).lower()
    if method not in ("lora", "qlora"):
        problems.append(f"tuning.method {method!r}: must be lora or qlora")
    config = yaml.safe_load(configmap["data"]["training_config.yaml"])["training_config"]
    known = {"ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DatasetConfig", "DataCollator"}
    problems += [f"training_config: unrecognised section {s}" for s in config if s not in known]
    quant = config.get("QuantizationConfig") or {}
    four, eight = quant.get("load_in_4bit", False), quant.get("load_in_8bit", False)
    if method == "lora" and (four or eight):
        problems.append("method lora: load_in_4bit / load_in_8bit must not be true")
    if method == "qlora" and not (four or eight):
        problems.append("method qlora: load_in_4bit or load_in_8bit must be true")
    out_dir = (config.get("TrainingArguments") or {}).get("output_dir")
    if out_dir is not None:
        # KAITO: filepath.Clean(filepath.Join("/mnt", dir)); Go's Join keeps an absolute dir under /mnt too.
        clean = posixpath.normpath(f"/mnt/{out_dir}")
        if clean == "/mnt" or not clean.startswith("/mnt/"):
            problems.append(f"TrainingArguments.output_dir {out_dir!r}: must be a directory under /mnt")
    sources = [k for k in ("urls", "image", "volumeSource") if tuning.get("input", {}).get(k)]
    if len(sources) != 1:
        problems.append("tuning.input: exactly one of urls, image, volumeSource")
    if workspace["tuning"].get("config") != configmap["metadata"]["name"]:
        problems.append("tuning.config does not name the ConfigMap")
    return problems
