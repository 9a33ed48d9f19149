"""What changes when a run spans several processes: who I am, how a step's batch is shared,
how gradients meet, and the DeepSpeed configuration.

Every process sees the same step batches (the order is a pure function of seed and epoch) and
takes every `world`-th example of each, so a global batch means the same thing with 1 or N
processes. Each process divides its summed loss by the *global* number of trained tokens and
multiplies by `world`, because DDP and DeepSpeed average gradients over processes: the update is
then exactly the single-process one (up to the order of floating-point sums).

The engines that run the forward, backward and step under each strategy are in `engines.py`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phitune.errors import PhituneError
from phitune.training.hyperparameters import chosen

if TYPE_CHECKING:
    from accelerate import Accelerator

    from phitune.config import Config

log = logging.getLogger("phitune")


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun, accelerate launch and the deepspeed launcher set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Runtime:
    strategy: str  # none | ddp | deepspeed | fsdp
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.parallel:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_over_processes(self, sums: dict, *scalars: float) -> tuple[list[float], dict]:
        """`scalars` and the values of `sums`, each added up over processes in one all-reduce
        (keys in sorted order: the same on every process)."""
        keys = sorted(sums)
        total = self.all_reduce_sum([*scalars] + [float(sums[k]) for k in keys])
        return total[: len(scalars)], dict(zip(keys, total[len(scalars) :]))

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world]

    def gather(self, value: object) -> list:
        """`value` from every process, in rank order."""
        if not self.parallel:
            return [value]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out


def finish(ok: bool = True) -> None:
    """Leave the process group before the interpreter exits: left to static destructors, gloo's
    threads can abort a finished process ("terminate called without an active exception"). After a
    failure there is no barrier: the other processes may never reach it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if ok:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def peak_memory_mb() -> dict:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry a launcher's peak across
    fork + exec) and, on CUDA, peak allocated GPU memory."""
    out: dict = {}
    try:
        with open("/proc/self/status") as f:
            out["rss_mb"] = next(round(int(line.split()[1]) / 1024, 1) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        out["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available():
        out["gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def resolve_strategy(cfg: Config, world: int) -> str:
    s = cfg.distributed.strategy
    if s == "auto":
        return "ddp" if world > 1 else "none"
    if s == "none" and world > 1:
        raise PhituneError(
            f"distributed.strategy: none, but {world} processes were started; use ddp, deepspeed or fsdp"
        )
    return s


def check_batch(cfg: Config, world: int) -> None:
    t = cfg.training
    if world > 1 and t.batch_size != "auto" and t.batch_size % (world * t.gradient_accumulation_steps):
        raise PhituneError(
            f"training.batch_size: {t.batch_size} examples cannot be shared by {world} processes x "
            f"{t.gradient_accumulation_steps} accumulation steps; make it a multiple of "
            f"{world * t.gradient_accumulation_steps}"
        )


def start(cfg: Config, precision: str) -> tuple[Accelerator, Runtime]:
    """The Accelerator (device, autocast, the process group) and this process's Runtime."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    rank, world, _ = env_world()
    strategy = resolve_strategy(cfg, world)
    check_batch(cfg, world)
    if strategy == "fsdp" and precision == "fp16":
        raise PhituneError(
            "training.precision: fp16 is not supported with fsdp here (no sharded loss scaling); use bf16 or fp32"
        )
    if strategy == "deepspeed":
        _deepspeed_available()
        if cfg.distributed.zero_stage == 3 and not torch.cuda.is_available() and rank == 0:
            # benchmarks/results/distributed_memory_breakdown.md: ZeRO-3 keeps an fp32 master copy
            # and a gradient buffer beside its parameter shards; FSDP2 keeps neither.
            log.info(
                "on CPU, distributed.strategy: fsdp holds less memory per process than ZeRO-3 "
                "(docs/guides/distributed.md: Memory per process)"
            )
    if strategy in ("deepspeed", "fsdp") and world == 1:  # both want a process group even for one process
        for key, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(free_port())),
        ):
            os.environ.setdefault(key, value)
    # Accelerate keeps one process-wide state; a second run in the same process (tests, the demo, a
    # notebook) may want another precision, which it refuses unless the state is cleared first.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_minutes))],
    )
    if strategy == "fsdp" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=cfg.distributed.timeout_minutes)
        )
    if strategy == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(minutes=cfg.distributed.timeout_minutes),
        )
    return accelerator, Runtime(strategy, rank, world)


def _deepspeed_available() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise PhituneError("distributed.strategy: deepspeed needs DeepSpeed: pip install 'phitune[deepspeed]'") from exc


def run_deepspeed_config(cfg: Config, runtime: Runtime) -> tuple[dict | None, object]:
    """(DeepSpeed config, what must stay alive while the model loads) for this run, or (None, None).

    Under ZeRO-3 transformers then loads the weights straight into shards (`zero.Init`): no
    process ever holds the whole model, which is what lets ZeRO-3 fit a model no single device can.
    """
    if runtime.strategy != "deepspeed":
        return None, None
    from transformers import AutoConfig

    try:
        hidden = getattr(
            AutoConfig.from_pretrained(
                cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
            ),
            "hidden_size",
            None,
        )
    except (OSError, ValueError):
        hidden = None  # the model loader reports an unreachable model with its own message
    config = deepspeed_config(cfg, runtime.world, hidden)
    if config["zero_optimization"]["stage"] != 3:
        return config, None
    from transformers.integrations import HfDeepSpeedConfig

    return config, HfDeepSpeedConfig(config)


def deepspeed_config(cfg: Config, world: int, hidden_size: int | None = None) -> dict:
    """What phitune derives, merged with the user's JSON; a key both set differently is an error."""
    t, d = cfg.training, cfg.distributed
    zero: dict = {"stage": d.zero_stage}
    if hidden_size and d.zero_stage == 3:
        # Sized to the model as transformers' "auto" does. DeepSpeed's defaults (buckets of 5e8
        # elements, up to 1e9 gathered parameters kept alive) let every process of a model smaller
        # than that end up holding it whole: measured 141% of DDP's peak memory, 123% with these.
        h2 = hidden_size * hidden_size
        zero.update(
            reduce_bucket_size=h2,
            stage3_prefetch_bucket_size=int(0.9 * h2),
            stage3_param_persistence_threshold=10 * hidden_size,
            stage3_max_live_parameters=32 * h2,
            stage3_max_reuse_distance=32 * h2,
            # The optimizer steps one sub-group of the shard at a time; DeepSpeed's 1e9-element
            # default is the whole shard at once, and AdamW's temporaries are then shard-sized.
            sub_group_size=32 * h2,
        )
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    derived = {
        "train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_micro_batch_size_per_gpu": chosen(t.batch_size, "batch_size") // (world * t.gradient_accumulation_steps),
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        # Our AdamW (or bitsandbytes') is used as given, also with offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not d.deepspeed_config:
        return derived
    path = Path(d.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PhituneError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the DeepSpeed config") from None
    for key in ("fp16", "bf16"):
        if isinstance(user.get(key), dict) and user[key].get("enabled"):
            raise PhituneError(
                f"{path}: {key}.enabled: phitune sets precision itself (training.precision); remove the '{key}' section"
            )
    if "optimizer" in user or "scheduler" in user:
        raise PhituneError(
            f"{path}: 'optimizer' / 'scheduler': phitune builds them from training.*; remove them from the DeepSpeed "
            "JSON"
        )
    return _merge(derived, user, path)


def _merge(derived: dict, user: dict, path: Path, prefix: str = "") -> dict:
    out = dict(user)
    for key, value in derived.items():
        if key not in user or user[key] == "auto":
            out[key] = value
        elif isinstance(value, dict) and isinstance(user[key], dict):
            out[key] = _merge(value, user[key], path, f"{prefix}{key}.")
        elif user[key] != value and key not in ("steps_per_print", "wall_clock_breakdown"):
            raise PhituneError(
                f"{path}: {prefix}{key} is {user[key]!r} but the phitune config gives {value!r}; "
                'set it in one place (or write "auto" in the JSON)'
            )
    return out
