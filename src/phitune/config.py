"""The one typed, strict configuration shared by the CLI, YAML files and (later) the HTTP API.

`load_config(path, overrides)` returns a `Config` or raises one `PhituneError` that lists every
problem at once: unknown keys (with the closest valid key), wrong types, bad values, missing
files. Field descriptions double as the reference documentation (`phitune config-reference`).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from phitune.errors import PhituneError

METHODS = ("full", "lora", "dora", "qlora", "ia3", "prompt_tuning")
ADAPTER_METHODS = ("lora", "dora", "qlora", "ia3", "prompt_tuning")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(description="Local directory or Hugging Face hub id of the base model.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer dir or hub id, when not beside the model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype. auto: float32 for full fine-tuning (master weights); for adapter methods "
        "the frozen base is stored in bfloat16 with bf16 precision or on CUDA (float16 without bf16 support), else float32.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto lets transformers choose (sdpa where it can)."
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model. Off unless you trust it.")


class MethodConfig(_Section):
    name: Literal["full", "lora", "dora", "qlora", "ia3", "prompt_tuning"] = Field(
        "lora", description="Fine-tuning method: " + ", ".join(METHODS) + "."
    )
    r: int = Field(16, gt=0, description="LoRA/DoRA/QLoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear",
        description="Module names (suffixes) to adapt, or 'all-linear' (every linear layer except the "
        "output head; finds Phi-3's fused qkv_proj and gate_up_proj); [all-linear, lm_head] adds the head.",
    )
    modules_to_save: Optional[list[str]] = Field(None, description="Extra modules trained in full and saved with the adapter.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha / sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="LoRA weight initialisation."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA 4-bit data type.")
    double_quant: bool = Field(True, description="QLoRA: quantise the quantisation constants too.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="QLoRA matmul dtype; auto: bfloat16 where supported, else float16/float32."
    )
    num_virtual_tokens: int = Field(20, gt=0, description="prompt_tuning: number of learned virtual tokens.")
    prompt_init_text: Optional[str] = Field(None, description="prompt_tuning: initialise virtual tokens from this text.")


class DataConfig(_Section):
    train: str = Field(description="Training file: OpenAI chat JSONL (one {\"messages\": [...]} per line).")
    validation: Optional[str] = Field(None, description="Validation file in the same format.")
    validation_split: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of train for validation (fixed seed) when no validation file."
    )
    max_length: int = Field(1024, gt=8, description="Tokens per example; longer examples are truncated (and counted).")


class TrainingConfig(_Section):
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to run (instead of epochs).")
    epochs: Optional[float] = Field(None, gt=0, description="Passes over the training data (default 1 when max_steps is unset).")
    batch_size: int = Field(8, gt=0, description="Examples per optimizer step (split into micro-batches by gradient_accumulation_steps).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step; batch_size must divide by it.")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw", description="adamw (torch) or a bitsandbytes 8-bit / paged AdamW."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision. auto: bf16 on CUDA with bf16 and on CPUs with native bf16 "
        "(AVX-512 BF16 or AMX), fp16 on older CUDA, fp32 on other CPUs."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    seed: int = Field(42, description="Seeds weights init of adapters, data order and dropout.")
    log_every: int = Field(1, gt=0, description="Log a metrics.jsonl line every N steps.")
    eval_every: Optional[int] = Field(None, gt=0, description="Evaluate on the validation set every N steps (and at the end).")
    save_every: Optional[int] = Field(None, gt=0, description="Write a resumable checkpoint every N steps.")
    save_total_limit: Optional[int] = Field(3, gt=0, description="Keep only the newest N checkpoints; null keeps all.")
    early_stopping_patience: Optional[int] = Field(
        None, gt=0, description="Stop after N evaluations without improvement of eval_loss."
    )
    tensorboard: Literal["auto", "on", "off"] = Field("auto", description="Write TensorBoard events to OUT/tensorboard (auto: when installed).")

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML 1.1 reads a bare `on` / `off` as true / false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class Config(_Section):
    model: ModelConfig
    method: MethodConfig = MethodConfig()
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    output_dir: str = Field("runs/latest", description="Where the adapter/model, checkpoints and metrics go.")

    @property
    def is_adapter(self) -> bool:
        return self.method.name in ADAPTER_METHODS


# The shorthands of the contract: `model: DIR`, `method: lora`, `data: FILE`.
_SHORTHAND = {"model": "name_or_path", "method": "name", "data": "train"}
_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "data": DataConfig,
    "training": TrainingConfig,
}


def _expand_shorthands(raw: dict) -> dict:
    out = dict(raw)
    for key, field in _SHORTHAND.items():
        if isinstance(out.get(key), str):
            out[key] = {field: out[key]}
    return out


def _valid_keys(section: str | None) -> list[str]:
    if section is None:
        return list(Config.model_fields)
    model = _SECTIONS.get(section)
    return list(model.model_fields) if model else []


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(choices)}"


def _key_lines(text: str) -> dict[str, int]:
    """Map 'a.b' key paths to 1-based YAML line numbers, so errors can point at the line."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)

    walk(node, "")
    return lines


def _format_error(err: dict, section: str | None) -> tuple[str, str]:
    loc = [str(x) for x in err["loc"]]
    path = ".".join(([section] if section else []) + loc)
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return path, f"unknown key{_suggest(loc[-1], _valid_keys(section if len(loc) == 1 else None))}"
    if err["type"] == "missing":
        return path, "required key is missing"
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return path, f"{err['msg'][:1].lower()}{err['msg'][1:]} (got {shown})"


def parse_config(raw: Any, *, source: str = "config", text: str | None = None) -> Config:
    """Validate a raw mapping; raise one PhituneError listing every problem."""
    if not isinstance(raw, dict):
        raise PhituneError(f"{source}: expected a mapping of sections (model, method, data, training, output_dir), got {type(raw).__name__}")
    raw = _expand_shorthands(raw)
    lines = _key_lines(text) if text else {}
    problems: list[str] = []

    def where(path: str) -> str:
        line = lines.get(path)
        return f"{source}:{line}: {path}" if line else f"{source}: {path}"

    for key in raw:
        if key not in Config.model_fields:
            problems.append(f"{where(key)}: unknown section{_suggest(key, _valid_keys(None))}")
    sections: dict[str, Any] = {}
    for name, model in _SECTIONS.items():
        value = raw.get(name)
        if value is None:
            if name in ("model", "data"):
                problems.append(f"{source}: {name}: required section is missing (e.g. `{name}: {'./models/tiny-phi3' if name == 'model' else 'data/train.jsonl'}`)")
            continue
        if not isinstance(value, dict):
            problems.append(f"{where(name)}: expected a mapping, got {value!r}")
            continue
        try:
            sections[name] = model.model_validate(value)
        except ValidationError as exc:
            for err in exc.errors():
                path, msg = _format_error(err, name)
                problems.append(f"{where(path)}: {msg}")
    if "output_dir" in raw and not isinstance(raw["output_dir"], str):
        problems.append(f"{where('output_dir')}: expected a path string, got {raw['output_dir']!r}")
    problems += [f"{where(p)}: {m}" for p, m in semantic_problems(sections)]
    if problems:
        n = len(problems)
        raise PhituneError(f"{source}: {n} problem{'s' if n > 1 else ''} in the configuration", problems=problems)
    return Config(**sections, **({"output_dir": raw["output_dir"]} if "output_dir" in raw else {}))


def semantic_problems(sections: dict[str, BaseModel]) -> list[tuple[str, str]]:
    """Checks across fields and against the file system, on whichever sections parsed; each is
    (key path, message with the fix). Running them on partial configs lets one pass report all."""
    out: list[tuple[str, str]] = []
    # A missing or unparsable training section is checked as its defaults.
    t: TrainingConfig = sections.get("training", TrainingConfig())
    data: DataConfig | None = sections.get("data")
    model: ModelConfig | None = sections.get("model")
    method: MethodConfig | None = sections.get("method")
    if t.max_steps is not None and t.epochs is not None:
        out.append(("training.epochs", f"set either training.max_steps ({t.max_steps}) or training.epochs ({t.epochs}), not both"))
    if t.batch_size % t.gradient_accumulation_steps:
        out.append((
            "training.gradient_accumulation_steps",
            f"batch_size {t.batch_size} is not divisible by gradient_accumulation_steps {t.gradient_accumulation_steps}; "
            "choose values where it divides",
        ))
    if data is not None:
        has_validation = bool(data.validation or data.validation_split)
        if t.early_stopping_patience and not (t.eval_every and has_validation):
            out.append(("training.early_stopping_patience", "needs training.eval_every and a validation set (data.validation or data.validation_split)"))
        elif t.eval_every and not has_validation:
            out.append(("training.eval_every", "needs a validation set: set data.validation to a file or data.validation_split to e.g. 0.1"))
    if data is not None:
        for key in ("train", "validation"):
            path = getattr(data, key)
            if path and not Path(path).is_file():
                out.append((f"data.{key}", f"file not found: {path} (relative paths are resolved from {Path.cwd()})"))
    if model is not None and looks_local(model.name_or_path) and not Path(model.name_or_path).is_dir():
        name = model.name_or_path
        out.append(("model.name_or_path", f"model directory not found: {name}; create one with `phitune create-model {name} --arch phi3 --preset tiny` or give a hub id"))
    if method is not None and method.name == "full" and method.modules_to_save:
        out.append(("method.modules_to_save", "only applies to adapter methods; remove it for method full"))
    return out


def looks_local(name: str) -> bool:
    """A hub id is `owner/name`; anything else (./x, /x, ~/x, x, a/b/c) or an existing path is local."""
    if Path(name).expanduser().exists():
        return True
    return not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or name.startswith((".", "/", "~"))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML scalars (1e-3, true, [a, b])."""
    raw = _expand_shorthands(raw)
    for item in overrides:
        if "=" not in item:
            raise PhituneError(f"--set {item!r}: expected section.key=value, e.g. --set training.learning_rate=1e-4")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value != "" else None
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if isinstance(node.get(part), str) and part in _SHORTHAND:
                node[part] = {_SHORTHAND[part]: node[part]}
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PhituneError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = parsed
        # `--set model=DIR` and friends keep working as shorthands.
        if len(parts) == 1 and isinstance(parsed, str) and parts[0] in _SHORTHAND:
            raw[parts[0]] = {_SHORTHAND[parts[0]]: parsed}
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict = {}
    text = None
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise PhituneError(f"{p}: config file not found; pass the path of a YAML file (see examples/*.yaml)")
        text = p.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise PhituneError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax at that line") from None
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=source, text=text)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _type_name(ann) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """Every key with its type, default and description, for the README and `phitune config-reference`."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, model in _SECTIONS.items():
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else f"`{json.dumps(field.default)}`"
            rows.append(f"| `{section}.{name}` | {_type_name(field.annotation)} | {default} | {field.description} |")
    rows.append(f"| `output_dir` | str | `\"runs/latest\"` | {Config.model_fields['output_dir'].description} |")
    return "\n".join(rows)
