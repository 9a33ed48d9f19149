"""From data files to training examples, checking everything on the way.

`load_split` reads a file (any supported type), converts every row with its format or task
preset, tokenizes, and collects every problem (errors: the run cannot use this file) and every
warning (it can, but you should know) with file:line. `phitune data validate` prints that
report; `phitune train` runs the same code first and stops on errors before loading the model.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phitune.data.formats import FORMATS, detect_format
from phitune.data.leakage import Leakage, find_leakage, whole_key
from phitune.data.packing import pack_stream, pack_whole
from phitune.data.readers import Row, read_rows
from phitune.data.tokenize import PairExample, tokenize_sample
from phitune.errors import PhituneError
from phitune.samples import Chat, FormatOptions, Plain, Preference, Tagged
from phitune.tasks import TASKS, TaskSpec, model_head
from phitune.tasks.base import missing_columns

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from phitune.config import Config, DataConfig, TaskConfig

MAX_SHOWN = 20
MIN_EXAMPLES = 10  # fewer is allowed (smoke tests) but almost never what a user meant


@dataclass
class Split:
    path: str
    format: str
    samples: list[tuple[str, object]] = field(default_factory=list)  # (where, sample)
    examples: list = field(default_factory=list)
    kept: list[tuple[str, object]] = field(default_factory=list)  # the (where, sample) of each example
    full_lengths: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # nothing left to train after truncation
    duplicate_sources: set[str] = field(default_factory=set)  # rows repeating an earlier row exactly

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_sources)


def format_options(data_cfg: DataConfig) -> FormatOptions:
    return FormatOptions(
        template=data_cfg.template,
        completion_field=data_cfg.completion_field,
        chat_template=data_cfg.chat_template,
        system=data_cfg.system,
    )


def resolve_format(data_cfg: DataConfig, task_name: str, rows: list[Row], source: str) -> str:
    """The format name, or the task preset's name for structured rows."""
    if TASKS[task_name].fields:  # structured rows: the task's preset converts them
        return task_name
    if data_cfg.format != "auto":
        return data_cfg.format
    detected = detect_format(rows, source)
    allowed = TASKS[task_name].formats
    if allowed and detected not in allowed:
        raise PhituneError(
            f"{source}: task.name {task_name} expects {' or '.join(allowed)} rows, but the rows look like "
            f"{detected}; set data.format or change task.name"
        )
    return detected


def read_split(
    path: str, data_cfg: DataConfig, task_cfg: TaskConfig, spec: TaskSpec | None = None
) -> tuple[Split, TaskSpec]:
    """Read and convert one file. The task spec comes from the training file; pass it for validation."""
    rows, errors = read_rows(path)
    if not rows:
        split = Split(str(path), data_cfg.format, errors=errors or [f"{path}: no examples; the file is empty"])
        return split, spec or TaskSpec()
    name = resolve_format(data_cfg, task_cfg.name, rows, str(path))
    opts = format_options(data_cfg)
    if spec is None:
        spec = TASKS[task_cfg.name].spec(task_cfg, rows)
    split = Split(str(path), name, errors=errors)
    preset = TASKS[task_cfg.name] if TASKS[task_cfg.name].fields else None  # None: the format converts
    absent = missing_columns(preset, spec, rows, str(path)) if preset else None
    if absent:
        split.errors.append(absent)
        return split, spec
    for row in rows:
        if preset:
            sample, problems = preset.to_sample(row.value, row.where, spec, opts)
        else:
            sample, problems = FORMATS[name](row.value, row.where, opts)
        if problems:
            split.errors += problems
        else:
            split.samples.append((row.where, sample))
    _sample_warnings(split, spec)
    return split, spec


def _sample_warnings(split: Split, spec: TaskSpec) -> None:
    first: dict[str, str] = {}
    for where, sample in split.samples:
        key = whole_key(sample)
        if key in first:
            split.duplicate_sources.add(where)
            split.warnings.append(
                f"{where}: exact duplicate of {first[key]}; it is dropped from training (data.dedupe)"
            )
        else:
            first[key] = where
        if isinstance(sample, Preference) and sample.chosen.strip() == sample.rejected.strip():
            split.warnings.append(
                f"{where}: preferred and non-preferred replies are identical; the pair teaches nothing"
            )
    taught = [label for _, s in split.samples if (label := TASKS[spec.name].sample_label(s)) is not None]
    if taught:
        counts = Counter(taught)
        once = sorted(label for label, n in counts.items() if n == 1)
        if once:
            split.warnings.append(
                f"{split.path}: label(s) seen only once: {', '.join(once)}; the model can hardly learn them"
            )
    if 0 < len(split.samples) < MIN_EXAMPLES:
        split.warnings.append(
            f"{split.path}: only {len(split.samples)} example(s); fine-tuning usually needs at least "
            f"{MIN_EXAMPLES} (50-100 well-chosen ones is a good start)"
        )


def tokenize_split(split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int, spec: TaskSpec) -> None:
    _, head_labels = model_head(spec)
    label_ids = {label: i for i, label in enumerate(head_labels)} if head_labels else None
    over = []
    for where, sample in split.samples:
        example, n = tokenize_sample(tokenizer, sample, max_length, where, label_ids)
        split.full_lengths.append(n)
        if n > max_length and not (isinstance(sample, Plain) and sample.pack):
            split.truncated += 1
            over.append(f"{where}: {n} tokens, {n - max_length} over data.max_length={max_length}; it is truncated")
        if example.num_trained == 0 or (
            isinstance(example, PairExample) and not (example.chosen.num_trained and example.rejected.num_trained)
        ):
            split.dropped.append(where)
        else:
            split.examples.append(example)
            split.kept.append((where, sample))
    split.warnings += over[:MAX_SHOWN] + (
        [f"... and {len(over) - MAX_SHOWN} more over data.max_length"] if len(over) > MAX_SHOWN else []
    )
    if split.dropped:
        split.warnings.append(
            f"{split.path}: {len(split.dropped)} example(s) have nothing left to train within "
            f"data.max_length={max_length} and are dropped (first: {split.dropped[0]}); raise data.max_length"
        )


LOUD = 0.10  # truncated or dropped beyond this fraction: a warning with the numbers, not an info line


def length_problem(split: Split, max_length: int, max_dropped: float) -> tuple[str | None, bool]:
    """(a warning about what data.max_length cuts, whether to refuse the run) for a tokenized
    split: loud past LOUD of the examples, refused when more than `max_dropped` are dropped."""
    n = len(split.full_lengths)
    if not n:
        return None, False
    cut, dropped = split.truncated, len(split.dropped)
    if (cut + dropped) / n <= LOUD:
        return None, False
    keeps = sorted(split.full_lengths)[max(0, math.ceil(0.99 * n) - 1)]
    message = (
        f"{split.path}: data.max_length={max_length} truncates {cut} of {n} examples ({cut / n:.0%}) and drops "
        f"{dropped} ({dropped / n:.0%}) with nothing left to train; data.max_length={keeps} would keep 99% whole"
    )
    refuse = dropped / n > max_dropped
    if refuse:
        message += (
            f" (more than data.max_dropped={max_dropped:g} dropped: "
            "raise max_length, or set data.max_dropped to train anyway)"
        )
    return message, refuse


def statistics_of(split: Split, spec: TaskSpec) -> dict:
    stats: dict = {
        "file": split.path,
        "format": split.format,
        "task": spec.name,
        "examples": len(split.samples),
        "errors": len(split.errors),
        "warnings": len(split.warnings),
        "duplicates": split.duplicates,
    }
    if split.full_lengths:
        lengths = sorted(split.full_lengths)
        stats["tokens"] = {
            "min": lengths[0],
            "median": int(statistics.median(lengths)),
            "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
            "max": lengths[-1],
            "total": sum(lengths),
        }
        stats["truncated"] = split.truncated
        stats["trained_tokens"] = sum(getattr(e, "num_trained", 0) for e in split.examples)
    roles: Counter = Counter()
    labels: Counter = Counter()
    for _, s in split.samples:
        if isinstance(s, Chat):
            roles.update(m["role"] for m in s.messages)
        elif isinstance(s, Preference):
            roles.update(m["role"] for m in s.prompt)
        if isinstance(s, Tagged):
            labels.update(t[2:] for t in s.tags if t.startswith("B-"))
        elif (label := TASKS[spec.name].sample_label(s)) is not None:
            labels[label] += 1
    if roles:
        stats["roles"] = dict(roles.most_common())
    if labels:
        stats["labels"] = dict(sorted(labels.items()))
    return stats


def raise_on_errors(split: Split) -> None:
    if split.errors:
        shown = split.errors[:MAX_SHOWN] + (
            [f"... and {len(split.errors) - MAX_SHOWN} more"] if len(split.errors) > MAX_SHOWN else []
        )
        raise PhituneError(
            f"{split.path}: {len(split.errors)} problem(s) in the data file "
            f"(run `phitune data validate {split.path}` for the full report)",
            problems=shown,
        )


# --- training data: splits, subsets, duplicates, packing ---------------------------------------


@dataclass
class TrainData:
    train: Split
    validation: Split | None
    spec: TaskSpec
    train_examples: list
    validation_examples: list | None
    packed: bool
    num_train_examples: int  # after the validation split and subset, before packing
    validation_samples: list | None = None  # (where, sample) of each validation example, for generated answers
    leakage: Leakage | None = None  # validation examples also in the training file


def use_packing(data_cfg: DataConfig, split: Split) -> bool:
    if data_cfg.packing == "auto":
        return split.format == "text"
    return data_cfg.packing == "on"


def load_training_data(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> TrainData:
    """Everything `train` needs from the data, or one PhituneError listing every problem."""
    train, spec = read_split(cfg.data.train, cfg.data, cfg.task)
    raise_on_errors(train)
    validation, leakage = None, None
    if cfg.data.validation:
        validation, _ = read_split(cfg.data.validation, cfg.data, cfg.task, spec)
        raise_on_errors(validation)
        leakage = find_leakage(validation.samples, train.samples)
    _check_objective(cfg, train)
    if cfg.data.dedupe and train.duplicates:
        train.samples = [(where, sample) for where, sample in train.samples if where not in train.duplicate_sources]
    tokenize_split(train, tokenizer, cfg.data.max_length, spec)
    if validation:
        tokenize_split(validation, tokenizer, cfg.data.max_length, spec)
    if not train.examples:
        raise PhituneError(
            f"{train.path}: no example has tokens left to train within data.max_length={cfg.data.max_length}; raise "
            "data.max_length"
        )
    examples = train.examples
    val_examples = validation.examples if validation else None
    val_samples = validation.kept if validation else None
    rng = random.Random(cfg.training.seed)
    if val_examples is None and cfg.data.validation_split:
        order = list(range(len(examples)))
        rng.shuffle(order)
        held = set(order[: max(1, round(len(order) * cfg.data.validation_split))])
        val_examples = [e for i, e in enumerate(examples) if i in held]
        val_samples = [s for i, s in enumerate(train.kept) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    if cfg.data.subset < 1.0:
        keep = sorted(rng.sample(range(len(examples)), max(1, round(len(examples) * cfg.data.subset))))
        examples = [examples[i] for i in keep]
    num_train = len(examples)
    packed = use_packing(cfg.data, train)
    if packed:
        if spec.head or cfg.method.objective == "dpo":
            raise PhituneError(
                "data.packing: on works for language-model training only; set it to off for "
                "classification heads and DPO"
            )
        pack = pack_stream if train.format == "text" else pack_whole
        examples = pack(examples, cfg.data.max_length)
    return TrainData(train, validation, spec, examples, val_examples, packed, num_train, val_samples, leakage)


def _check_objective(cfg, train: Split) -> None:
    prefs = any(isinstance(s, Preference) for _, s in train.samples)
    if cfg.method.objective == "dpo" and not prefs:
        raise PhituneError(
            f"{train.path}: method.objective dpo needs preference rows ({{input, preferred_output, "
            f"non_preferred_output}} or {{prompt, chosen, rejected}}); this file is {train.format}"
        )
    if cfg.method.objective != "dpo" and prefs:
        raise PhituneError(
            f"{train.path}: preference pairs train with method.objective: dpo (set it, or give SFT data)"
        )


def tokenize_file(
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    max_length: int,
    data_cfg: DataConfig | None = None,
    task_cfg: TaskConfig | None = None,
) -> Split:
    """One file, checked and tokenized (errors raised): for evaluation, the demo and benchmarks."""
    from phitune.config import DataConfig, TaskConfig

    data_cfg = data_cfg or DataConfig(train=str(path), max_length=max_length)
    split, spec = read_split(path, data_cfg, task_cfg or TaskConfig())
    raise_on_errors(split)
    tokenize_split(split, tokenizer, max_length, spec)
    return split


def summary_lines(stats: dict) -> list[str]:
    out = [
        f"format {stats['format']}"
        + (f", task {stats['task']}" if stats["task"] != "none" else "")
        + f": {stats['examples']} examples, {stats['errors']} error(s), {stats['warnings']} warning(s), "
        f"{stats['duplicates']} exact duplicate(s)"
    ]
    if "tokens" in stats:
        t = stats["tokens"]
        out.append(
            f"tokens per example: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']} "
            f"(total {t['total']}, trained {stats['trained_tokens']}); truncated: {stats['truncated']}"
        )
    for key in ("roles", "labels"):
        if key in stats:
            out.append(f"{key}: " + ", ".join(f"{k} {v}" for k, v in stats[key].items()))
    return out
