"""The `auto` training hyperparameters: epochs, batch size and learning rate chosen from the
training set (its examples and tokens) and the model (its width and the method), as the OpenAI
fine-tuning API chooses them from the example count. `phitune train`, the service and the KAITO
manifest all resolve `auto` here, so one dataset gets the same choice everywhere.

The rules, and why:
- batch size ~ sqrt(examples) / 2, a power of two in [4, 32]: small sets get more, smaller steps
  (a 300-row set would see 19 updates an epoch at the usual 16);
- 3 epochs, more for tiny sets (at least ~60 optimizer steps, at most 10 epochs) and fewer once
  the run would pass 25,000 examples or 20 million tokens, where one pass already teaches enough;
- learning rate for LoRA-family adapters 1e-3 at SmolLM2's width (576) falling as 1 / width
  (about 2e-4 at Phi-3-mini's 3072, the value hand-set recipes use there), full fine-tuning a
  tenth of that, DPO a tenth again (it starts from a model that already answers), prompt tuning
  ten times more (its few parameters move slowly).
benchmarks/auto_vs_trl.py measures the result against hand-set TRL on the real model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from phitune.methods import METHODS

if TYPE_CHECKING:
    from phitune.config import Config, TrainingConfig
    from phitune.data.dataset import TrainData

AUTO = "auto"
AUTO_KEYS = ("epochs", "batch_size", "learning_rate")
T = TypeVar("T")


def chosen(value: T | Literal["auto"], key: str) -> T:
    """A training value the run reads after `for_run` replaced its `auto` (the recipe's view)."""
    if value == AUTO:
        raise RuntimeError(f"training.{key} is still auto; hyperparameters.for_run chooses it before training")
    return cast(T, value)


REFERENCE_WIDTH = 576  # SmolLM2-135M's hidden size, where the adapter rate was measured
ADAPTER_RATE = 1e-3
ADAPTER_RANGE = (5e-5, 2e-3)  # beyond the widths the rule was checked on, stay within common practice
MIN_STEPS, MAX_EPOCHS, TARGET_EPOCHS = 60, 10, 3
MAX_EXAMPLES_SEEN, MAX_TOKENS_SEEN = 25_000, 20_000_000


@dataclass(frozen=True)
class Choice:
    epochs: float
    batch_size: int
    learning_rate: float
    why: str

    def as_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "why": self.why,
        }


def auto_batch_size(examples: int, multiple: int = 1) -> int:
    size = 2 ** round(math.log2(max(1.0, math.sqrt(max(examples, 1)) / 2)))
    size = min(32, max(4, size))
    return math.ceil(size / multiple) * multiple  # every process and micro-batch gets a whole share


def auto_epochs(examples: int, tokens: int | None, batch_size: int) -> float:
    n = max(examples, 1)
    epochs = float(max(TARGET_EPOCHS, min(MAX_EPOCHS, math.ceil(MIN_STEPS * batch_size / n))))
    limit = MAX_EXAMPLES_SEEN / n
    if tokens:
        limit = min(limit, MAX_TOKENS_SEEN / tokens)
    if epochs > limit:
        epochs = max(1.0, round(limit, 2))
    return epochs


def auto_learning_rate(hidden_size: int | None, method: str, objective: str) -> float:
    rate = ADAPTER_RATE * REFERENCE_WIDTH / (hidden_size or REFERENCE_WIDTH)
    rate = min(ADAPTER_RANGE[1], max(ADAPTER_RANGE[0], rate)) * METHODS[method].lr_scale
    if objective == "dpo":
        rate /= 10
    return float(f"{rate:.2g}")


def choose(
    *,
    examples: int,
    tokens: int | None,
    hidden_size: int | None,
    method: str,
    objective: str = "sft",
    batch_multiple: int = 1,
) -> Choice:
    batch = auto_batch_size(examples, batch_multiple)
    epochs = auto_epochs(examples, tokens, batch)
    rate = auto_learning_rate(hidden_size, method, objective)
    seen = f"{examples} examples" + (f", {tokens:,} tokens" if tokens else "")
    return Choice(
        epochs,
        batch,
        rate,
        f"{seen}; hidden size {hidden_size or 'unknown'}, {method}" + (" dpo" if objective == "dpo" else ""),
    )


def resolve(training: TrainingConfig, choice_for: Callable[[], Any]) -> tuple[Any, dict]:
    """A TrainingConfig with its `auto` values replaced, and {key: value} of those replaced.
    `choice_for()` is called only when something is auto (it may load a config or count tokens)."""
    wanted = [k for k in AUTO_KEYS if getattr(training, k) == AUTO and not (k == "epochs" and training.max_steps)]
    ignored = {"epochs": None} if training.epochs == AUTO and training.max_steps else {}  # max_steps decides the length
    if not wanted:
        return training.model_copy(update=ignored), {}
    choice = choice_for()
    chosen = {k: getattr(choice, k) for k in wanted}
    return training.model_copy(update=ignored | chosen), chosen | {"why": choice.why}


def for_run(cfg: Config, data: TrainData, world: int = 1) -> tuple[Config, dict]:
    """The run's config with training's `auto` values chosen from its loaded data, and the record
    of what was chosen for run.json ({} when nothing was auto)."""
    m, t = cfg.model, cfg.training

    def choice() -> Choice:
        return choose(
            examples=len(data.train_examples),
            tokens=sum(data.train.full_lengths) or None,
            hidden_size=model_width(m.name_or_path, trust_remote_code=m.trust_remote_code, revision=m.revision),
            method=cfg.method.name,
            objective=cfg.method.objective,
            batch_multiple=world * t.gradient_accumulation_steps,
        )

    training, chosen = resolve(t, choice)
    return cfg.model_copy(update={"training": training}), chosen


def for_manifest(cfg: Config, examples: int | None, width: int | None = None) -> tuple[object, list[str]]:
    """For a manifest that another trainer runs (KAITO): `auto` resolved from the local training
    file's row count and the model's config, or the problems that keep it from being resolved."""
    t, m = cfg.training, cfg.model
    if width is None and t.learning_rate == AUTO:
        width = model_width(m.name_or_path, trust_remote_code=m.trust_remote_code, revision=m.revision, local_only=True)
    problems = []
    if examples is None and (t.batch_size == AUTO or (t.epochs == AUTO and not t.max_steps)):
        problems.append(
            f"training.batch_size / training.epochs: auto counts the examples of data.train ({cfg.data.train}), "
            "which has no readable rows here; set both"
        )
    if width is None and t.learning_rate == AUTO:
        problems.append(
            f"training.learning_rate: auto reads the hidden size from {m.name_or_path}'s config, which is "
            "not available here; set it (phitune's rule: LoRA 1e-3 x 576 / hidden_size)"
        )
    if problems:
        return cfg, problems
    training, _ = resolve(
        t,
        lambda: choose(
            examples=examples or 0,
            tokens=None,
            hidden_size=width,
            method=cfg.method.name,
            objective=cfg.method.objective,
            batch_multiple=t.gradient_accumulation_steps,
        ),
    )
    return cfg.model_copy(update={"training": training}), []


# transformers' lazy module is not thread-safe on first import: two threads (the service worker's
# validation lane and its training loop) importing AutoConfig at once saw "cannot import name".
_IMPORTING = threading.Lock()


def model_width(
    name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None, local_only: bool = False
) -> int | None:
    """The model's hidden size from its config (None when it cannot be read). `local_only`: a
    directory or the hub cache, never the network (for commands that do not train)."""
    try:
        with _IMPORTING:
            from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision, local_files_only=local_only
        )
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or getattr(config, "n_embd", None)
