"""What changes when a run spans several processes: who I am, how a step's batch is shared,
how gradients meet, and the DeepSpeed engine.

Every process sees the same step batches (the order is a pure function of seed and epoch) and
takes every `world`-th example of each, so a global batch means the same thing with 1 or N
processes. Each process divides its summed loss by the *global* number of trained tokens and
multiplies by `world`, because DDP and DeepSpeed average gradients over processes: the update is
then exactly the single-process one (up to the order of floating-point sums).

Three engines with the same small surface (`forward`, `backward`, `step`, `unwrap`, `gathered`,
checkpoint weights): `PlainEngine` (one process, or plain data parallelism), `DeepSpeedEngine`
(ZeRO 0-3, CPU offload) and `FsdpEngine` (FSDP2), whose sharded weights are gathered before
anything is saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from phitune.errors import PhituneError

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

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world]

    def gather(self, value) -> list:
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


def resolve_strategy(cfg, world: int) -> str:
    s = cfg.distributed.strategy
    if s == "auto":
        return "ddp" if world > 1 else "none"
    if s == "none" and world > 1:
        raise PhituneError(f"distributed.strategy: none, but {world} processes were started; use ddp, deepspeed or fsdp")
    return s


def check_batch(cfg, world: int) -> None:
    t = cfg.training
    if world > 1 and t.batch_size != "auto" and t.batch_size % (world * t.gradient_accumulation_steps):
        raise PhituneError(
            f"training.batch_size: {t.batch_size} examples cannot be shared by {world} processes x "
            f"{t.gradient_accumulation_steps} accumulation steps; make it a multiple of {world * t.gradient_accumulation_steps}"
        )


def start(cfg, precision: str):
    """The Accelerator (device, autocast, the process group) and this process's Runtime."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    rank, world, _ = env_world()
    strategy = resolve_strategy(cfg, world)
    check_batch(cfg, world)
    if strategy == "fsdp" and precision == "fp16":
        raise PhituneError("training.precision: fp16 is not supported with fsdp here (no sharded loss scaling); use bf16 or fp32")
    if strategy == "deepspeed":
        _deepspeed_available()
    if strategy in ("deepspeed", "fsdp") and world == 1:  # both want a process group even for one process
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, value)
    # Accelerate keeps one process-wide state; a second run in the same process (tests, the demo, a
    # notebook) may want another precision, which it refuses unless the state is cleared first.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_minutes))])
    if strategy == "fsdp" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    if strategy == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    return accelerator, Runtime(strategy, rank, world)


def _deepspeed_available() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise PhituneError("distributed.strategy: deepspeed needs DeepSpeed: pip install 'phitune[deepspeed]'") from exc


# --- engines ----------------------------------------------------------------------------------


class CallThrough(torch.nn.Module):
    """What DeepSpeed wraps: `forward(fn, *args)` runs `fn(model, *args)`. Any computation on the
    model (decoder and head apart, the adapter switched off for DPO's reference) then goes through
    the engine's own forward, whose bookkeeping ZeRO needs (micro-step counting for accumulation,
    parameter fetching, backward hooks)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, fn, *args, **kwargs):
        return fn(self.inner, *args, **kwargs)


class PlainEngine:
    """One process, or plain data parallelism: the model is replicated and gradients are summed
    over processes once per optimizer step, in one flat buffer.

    Not torch's DistributedDataParallel wrapper on purpose: the loss runs the decoder and the
    output head separately (the head only on labelled positions), a path DDP's forward hooks would
    not see; one all-reduce per step is also what DDP's no_sync accumulation amounts to.
    """

    sharded = False  # every process holds all the weights

    def __init__(self, accelerator, model, optimizer, runtime: Runtime):
        self.accelerator, self.runtime = accelerator, runtime
        self.model = model.to(accelerator.device)
        # The optimizer goes through Accelerate for fp16 loss scaling; the model needs no wrapper.
        self.optimizer = accelerator.prepare_optimizer(optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if runtime.parallel:  # the same start everywhere, whatever each process's RNG did
            for p in self.trainable:
                torch.distributed.broadcast(p.data, src=0)

    def forward(self, fn, *args):
        return fn(self.model, *args)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, max_grad_norm: float | None) -> float | None:
        if self.runtime.parallel:
            self._average_gradients()
        norm = float(self.accelerator.clip_grad_norm_(self.trainable, max_grad_norm)) if max_grad_norm else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _average_gradients(self) -> None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.runtime.world
        for p, g in zip(self.trainable, _unflatten_dense_tensors(flat, grads)):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    def unwrap(self):
        return self.model

    def gathered(self, params=None):
        return contextlib.nullcontext()

    def adapter_state_dict(self) -> dict | None:
        return None  # PEFT reads the (whole) weights itself

    def save_weights(self, path: Path) -> None:
        from safetensors.torch import save_file

        if self.runtime.is_main:
            save_file(trainable_state(self.unwrap()), str(path / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")

    def load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(self.unwrap().named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing:
            raise PhituneError(
                f"{path}: checkpoint does not match this model/method ({len(missing)} trainable tensors missing, e.g. {missing[0]}); "
                "resume with the configuration the run started with"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


class DeepSpeedEngine:
    """DeepSpeed ZeRO. `backward` then `step` on every micro-batch: the engine applies the update
    (with its own clipping) at the accumulation boundary and only counts micro-steps in between."""

    TAG = "zero"

    def __init__(self, model, optimizer, runtime: Runtime, config: dict):
        import deepspeed

        self.runtime = runtime
        self.config = config
        self.stage = self.config["zero_optimization"]["stage"]
        self.sharded = self.stage == 3
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=CallThrough(model), optimizer=optimizer, config=self.config)

    def forward(self, fn, *args):
        return self.model(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already scaled for the whole optimizer step: no division by accumulation steps.
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()

    def step(self, max_grad_norm: float | None) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def unwrap(self):
        return self.model.module.inner

    def gathered(self, params=None):
        """Under ZeRO-3 each process holds a shard of every parameter: gather them (on every
        process, a collective) before reading or saving weights."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        # Parameters still being fetched by the last forward's prefetch cannot be gathered: release them first.
        self.model.empty_partition_cache()
        params = list(params if params is not None else self.unwrap().parameters())
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def adapter_state_dict(self) -> dict | None:
        """Under ZeRO-3, the adapter's tensors (see adapter_tensor_names) gathered whole, one at a
        time, on every process."""
        if self.stage != 3:
            return None
        import deepspeed

        model = self.unwrap()
        wanted = adapter_tensor_names(model)
        self.model.empty_partition_cache()
        out = {}
        for name, param in model.named_parameters():
            if name in wanted:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    out[name] = param.detach().cpu().clone()
        return out

    def save_weights(self, path: Path) -> None:
        # Every process writes its own optimizer shard; frozen base weights are not repeated.
        self.model.save_checkpoint(str(path / "deepspeed"), tag=self.TAG, save_latest=False,
                                   exclude_frozen_parameters=any(not p.requires_grad for p in self.unwrap().parameters()))

    def load_weights(self, path: Path) -> None:
        if not (path / "deepspeed" / self.TAG).is_dir():
            raise PhituneError(f"{path}: not a DeepSpeed checkpoint (no deepspeed/{self.TAG}/); resume with the "
                               "distributed settings the run started with")
        loaded, _ = self.model.load_checkpoint(str(path / "deepspeed"), tag=self.TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise PhituneError(f"{path}: DeepSpeed could not load this checkpoint; resume with the same number of processes")


class FsdpEngine:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer, then the rest of the
    model, sharded across processes; parameters are gathered layer by layer in forward and
    backward, gradients reduce-scattered. The root is a `CallThrough`, so the loss's separate
    decoder and head calls still run inside the root's forward hooks."""

    def __init__(self, model, make_optimizer, runtime: Runtime, precision: str, device):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.runtime = runtime
        self.sharded = True
        model = model.to(device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
        layers = set(getattr(_transformer(model), "_no_split_modules", None) or ())
        if not layers:
            raise PhituneError("distributed.strategy: fsdp needs the model's decoder layer class (_no_split_modules); use deepspeed")
        for module in model.modules():
            if type(module).__name__ in layers:
                fully_shard(module, mp_policy=policy)
        self.model = fully_shard(CallThrough(model), mp_policy=policy)
        self.optimizer = make_optimizer(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, fn, *args):
        return self.model(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None) -> float | None:
        norm = None
        if max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def unwrap(self):
        return self.model.inner

    def gathered(self, params=None):
        return contextlib.nullcontext()  # whole weights come from full_state_dict() instead

    def full_state_dict(self, names: set[str] | None = None) -> dict:
        """The model's weights, whole, on the main process (a collective: every process calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out = {k.removeprefix("inner."): v for k, v in full.items()}
        return {k: v for k, v in out.items() if names is None or k in names}

    def adapter_state_dict(self) -> dict:
        return self.full_state_dict(adapter_tensor_names(self.unwrap()))

    def save_weights(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / "fsdp"))

    def load_weights(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        if not (path / "fsdp").is_dir():
            raise PhituneError(f"{path}: not an FSDP checkpoint (no fsdp/); resume with the distributed settings the run started with")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "fsdp"))
        # Frozen base weights are not in the checkpoint (they come from the base model): not strict.
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _transformer(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_tensor_names(model) -> set[str]:
    """Which of the model's tensors PEFT saves in an adapter, asked of PEFT itself: it is handed
    placeholders and the ones that come back are the answer. Not only the trainable ones: with an
    embedding or the output head among the targets PEFT also saves that layer's frozen base
    weight, which a trainable-only gather would leave as an empty shard (TRL #4416, PEFT #2892)."""
    from peft import get_peft_model_state_dict

    probes = {k: torch.empty(0) for k in model.state_dict()}
    by_id = {id(v): k for k, v in probes.items()}
    return {by_id[id(v)] for v in get_peft_model_state_dict(model, state_dict=probes).values() if id(v) in by_id}


def run_deepspeed_config(cfg, runtime: Runtime):
    """(DeepSpeed config, what must stay alive while the model loads) for this run, or (None, None).

    Under ZeRO-3 transformers then loads the weights straight into shards (`zero.Init`): no
    process ever holds the whole model, which is what lets ZeRO-3 fit a model no single device can.
    """
    if runtime.strategy != "deepspeed":
        return None, None
    from transformers import AutoConfig

    try:
        hidden = getattr(AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                                    trust_remote_code=cfg.model.trust_remote_code), "hidden_size", None)
    except (OSError, ValueError):
        hidden = None  # the model loader reports an unreachable model with its own message
    config = deepspeed_config(cfg, runtime.world, hidden)
    if config["zero_optimization"]["stage"] != 3:
        return config, None
    from transformers.integrations import HfDeepSpeedConfig

    return config, HfDeepSpeedConfig(config)


def deepspeed_config(cfg, world: int, hidden_size: int | None = None) -> dict:
    """What phitune derives, merged with the user's JSON; a key both set differently is an error."""
    t, d = cfg.training, cfg.distributed
    zero: dict = {"stage": d.zero_stage}
    if hidden_size and d.zero_stage == 3:
        # Sized to the model as transformers' "auto" does. DeepSpeed's defaults (buckets of 5e8
        # elements, up to 1e9 gathered parameters kept alive) let every process of a model smaller
        # than that end up holding it whole: measured 141% of DDP's peak memory, 123% with these.
        h2 = hidden_size * hidden_size
        zero.update(reduce_bucket_size=h2, stage3_prefetch_bucket_size=int(0.9 * h2),
                    stage3_param_persistence_threshold=10 * hidden_size,
                    stage3_max_live_parameters=32 * h2, stage3_max_reuse_distance=32 * h2)
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    derived = {
        "train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_micro_batch_size_per_gpu": t.batch_size // (world * t.gradient_accumulation_steps),
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
            raise PhituneError(f"{path}: {key}.enabled: phitune sets precision itself (training.precision); remove the '{key}' section")
    if "optimizer" in user or "scheduler" in user:
        raise PhituneError(f"{path}: 'optimizer' / 'scheduler': phitune builds them from training.*; remove them from the DeepSpeed JSON")
    return _merge(derived, user, path)


def _merge(derived: dict, user: dict, path: Path, prefix: str = "") -> dict:
    out = dict(user)
    for key, value in derived.items():
        if key not in user or user[key] == "auto":
            out[key] = value
        elif isinstance(value, dict) and isinstance(user[key], dict):
            out[key] = _merge(value, user[key], path, f"{prefix}{key}.")
        elif user[key] != value and key not in ("steps_per_print", "wall_clock_breakdown"):
            raise PhituneError(f"{path}: {prefix}{key} is {user[key]!r} but the phitune config gives {value!r}; "
                               "set it in one place (or write \"auto\" in the JSON)")
    return out
