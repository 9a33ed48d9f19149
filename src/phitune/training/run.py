"""What a fine-tuning run is once set up (`Run`, read by the loop, the evaluations and the saving)
and what it returns (`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from phitune.config import Config
from phitune.data.dataset import TrainData
from phitune.training.checkpoint import TrainState
from phitune.training.distributed import Runtime
from phitune.training.engines import Engine
from phitune.training.objectives import Objective
from phitune.training.progress import Progress
from phitune.training.tracking import MetricsLog, Startup

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedTokenizerBase


@dataclass
class StepResult:
    """What one optimizer step did: its loss (per trained token), the objective's sums, the
    tokens it trained on (step_tokens) and saw (real_tokens), and the gradient norm."""

    loss: float
    sums: dict
    step_tokens: int
    real_tokens: int
    grad_norm: float | None


@dataclass
class RunResult:
    output_dir: Path
    state: TrainState
    final_train_loss: float | None
    eval_metrics: dict | None
    artifact: Path


@dataclass(kw_only=True)  # built by keyword: two bools or two dicts side by side cannot swap
class Run:
    """A run once set up: what the loop, the evaluations and the saving read."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    runtime: Runtime
    tokenizer: PreTrainedTokenizerBase
    data: TrainData
    chosen: dict | None  # what `auto` hyperparameters became, and why
    engine: Engine
    scheduler: LRScheduler
    objective: Objective
    steps: int
    answers_scored: bool  # the evaluation also scores generated answers with the task metric
    best_metric: str
    state: TrainState
    resumed: bool
    weights: dict  # trainable parameters and weight memory, for run.json
    initial: Path | None  # PiSSA / OLoRA's initial adapter, which saving converts against
    eval_metrics: dict | None = None
    last_loss: float | None = None
    metrics: MetricsLog | None = field(default=None, repr=False)
    progress: Progress | None = field(default=None, repr=False)
    # transformers' ZeRO-3 switch (HfDeepSpeedConfig): weakly referenced there, so held here for the run.
    zero3_loading: object = field(default=None, repr=False)
    startup: Startup = field(default_factory=Startup, repr=False)
