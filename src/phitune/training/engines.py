"""The engines that run a step under each strategy, all with one surface (`Engine`):
`PlainEngine` (one process, or plain data parallelism), `DeepSpeedEngine` (ZeRO 0-3, CPU
offload) and `FsdpEngine` (FSDP2), whose sharded weights are gathered before anything is saved.
A new strategy is a class with these methods and a line in `ENGINES`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, NamedTuple, Protocol

import torch

from phitune.errors import PhituneError
from phitune.training.distributed import Runtime
from phitune.training.streamed_safetensors import Slot

if TYPE_CHECKING:
    from accelerate import Accelerator


class WholeWeights(NamedTuple):
    """A sharded model's weights as they are gathered: the header of the file (`slots`) first,
    then each tensor whole on the main process. Every process must exhaust `tensors`: each
    gather is a collective; the other processes get nothing."""

    slots: list[Slot]
    tensors: Iterator[tuple[str, torch.Tensor]]


def state_tensors(model: torch.nn.Module, names: set[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter or buffer) in state-dict order: the names asked for, or else every
    tensor, a tied parameter under its first name only (the one save_pretrained keeps)."""
    state = model.state_dict(keep_vars=True)
    if names is not None:
        return [(n, t) for n, t in state.items() if n in names]
    seen: set[int] = set()
    out = []
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def gathering(entries: list[tuple[str, torch.Tensor]], gather: Callable) -> WholeWeights:
    """`entries` as `gather(entries)` yields them whole; a ZeRO-3 partition tells its whole shape
    by `ds_shape`, a DTensor by its own shape."""
    slots = [Slot(n, tuple(getattr(t, "ds_shape", t.shape)), t.dtype) for n, t in entries]
    return WholeWeights(slots, gather(entries))


class Engine(Protocol):
    model: torch.nn.Module  # what train()/eval() switch: the model, or the wrapper around it
    optimizer: Any
    sharded: bool  # no process holds every weight (generation must run in step)

    def forward(self, fn: Callable, *args: Any) -> Any:
        """`fn(model, *args)`, inside the wrapper's forward (its hooks gather sharded weights)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, max_grad_norm: float | None) -> float | None:
        """The optimizer step (clipping first); the gradient norm when it was measured."""

    def unwrap(self) -> Any:
        """The model itself (PEFT or transformers; typed Any: their methods are not nn.Module's),
        without the engine's wrapper."""

    def gathered(self, params: list | None = None) -> ContextManager:
        """Inside it every process holds `params` (default: all) whole."""

    def adapter_state_dict(self) -> dict | None:
        """The adapter's tensors, whole (a collective); None when PEFT can read them itself."""

    def whole_weights(self, names: set[str] | None = None) -> WholeWeights | None:
        """Every weight (or only `names`), gathered one at a time (a collective); None when the
        model's own state dict is whole."""

    def save_weights(self, path: Path) -> None: ...

    def load_weights(self, path: Path) -> None: ...


class CallThrough(torch.nn.Module):
    """What DeepSpeed wraps: `forward(fn, *args)` runs `fn(model, *args)`. Any computation on the
    model (decoder and head apart, the adapter switched off for DPO's reference) then goes through
    the engine's own forward, whose bookkeeping ZeRO needs (micro-step counting for accumulation,
    parameter fetching, backward hooks)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(self.inner, *args, **kwargs)


class PlainEngine:
    """One process, or plain data parallelism: the model is replicated and gradients are summed
    over processes once per optimizer step, in one flat buffer.

    Not torch's DistributedDataParallel wrapper on purpose: the loss runs the decoder and the
    output head separately (the head only on labelled positions), a path DDP's forward hooks would
    not see; one all-reduce per step is also what DDP's no_sync accumulation amounts to.
    """

    sharded = False  # every process holds all the weights

    def __init__(self, accelerator, model, optimizer, runtime: Runtime) -> None:
        self.accelerator, self.runtime = accelerator, runtime
        self.model = model.to(accelerator.device)
        # The optimizer goes through Accelerate for fp16 loss scaling; the model needs no wrapper.
        self.optimizer = accelerator.prepare_optimizer(optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if runtime.parallel:  # the same start everywhere, whatever each process's RNG did
            for p in self.trainable:
                torch.distributed.broadcast(p.data, src=0)

    def forward(self, fn: Callable, *args: Any) -> Any:
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

    def unwrap(self) -> Any:
        return self.model

    def gathered(self, params: list | None = None) -> ContextManager:
        return contextlib.nullcontext()

    def adapter_state_dict(self) -> dict | None:
        return None  # PEFT reads the (whole) weights itself

    def whole_weights(self, names: set[str] | None = None) -> WholeWeights | None:
        return None  # the model's own state dict is whole

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
                f"{path}: checkpoint does not match this model/method ({len(missing)} trainable tensors missing, "
                f"e.g. {missing[0]}); "
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

    def __init__(self, model, optimizer, runtime: Runtime, config: dict) -> None:
        import deepspeed

        self.runtime = runtime
        self.config = config
        self.stage = self.config["zero_optimization"]["stage"]
        self.sharded = self.stage == 3
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=CallThrough(model), optimizer=optimizer, config=self.config
        )

    def forward(self, fn: Callable, *args: Any) -> Any:
        return self.model(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already scaled for the whole optimizer step: no division by accumulation steps.
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()

    def step(self, max_grad_norm: float | None) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def unwrap(self) -> Any:
        return self.model.module.inner

    def gathered(self, params: list | None = None) -> ContextManager:
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
        """Under ZeRO-3, the adapter's tensors (see adapter_tensor_names), gathered one at a time."""
        if self.stage != 3:
            return None
        weights = self.whole_weights(adapter_tensor_names(self.unwrap()))
        return dict(weights.tensors) if weights is not None else None

    def whole_weights(self, names: set[str] | None = None) -> WholeWeights | None:
        """Under ZeRO-3, each weight (or only `names`) gathered in turn and copied to the main
        process only. Holding the whole model at once made saving the run's memory peak
        (benchmarks/results/distributed_memory_breakdown.md)."""
        if self.stage != 3:
            return None
        self.model.empty_partition_cache()
        return gathering(state_tensors(self.unwrap(), names), self._gather_each)

    def _gather_each(self, entries: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        for name, tensor in entries:
            if hasattr(tensor, "ds_id"):  # a ZeRO-3 partition; buffers are never partitioned
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    whole = tensor.detach().cpu().clone() if self.runtime.is_main else None
            else:
                whole = tensor.detach().cpu()
            if self.runtime.is_main and whole is not None:
                yield name, whole

    def save_weights(self, path: Path) -> None:
        # Every process writes its own optimizer shard; frozen base weights are not repeated.
        self.model.save_checkpoint(
            str(path / "deepspeed"),
            tag=self.TAG,
            save_latest=False,
            exclude_frozen_parameters=any(not p.requires_grad for p in self.unwrap().parameters()),
        )

    def load_weights(self, path: Path) -> None:
        if not (path / "deepspeed" / self.TAG).is_dir():
            raise PhituneError(
                f"{path}: not a DeepSpeed checkpoint (no deepspeed/{self.TAG}/); resume with the "
                "distributed settings the run started with"
            )
        loaded, _ = self.model.load_checkpoint(
            str(path / "deepspeed"),
            tag=self.TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise PhituneError(
                f"{path}: DeepSpeed could not load this checkpoint; resume with the same number of processes"
            )


class FsdpEngine:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer, then the rest of the
    model, sharded across processes; parameters are gathered layer by layer in forward and
    backward, gradients reduce-scattered. The root is a `CallThrough`, so the loss's separate
    decoder and head calls still run inside the root's forward hooks."""

    def __init__(self, model, make_optimizer, runtime: Runtime, precision: str, device) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.runtime = runtime
        self.sharded = True
        model = model.to(device)
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16"
            else MixedPrecisionPolicy()
        )
        layers = set(getattr(_transformer(model), "_no_split_modules", None) or ())
        if not layers:
            raise PhituneError(
                "distributed.strategy: fsdp needs the model's decoder layer class (_no_split_modules); use deepspeed"
            )
        for module in model.modules():
            if type(module).__name__ in layers:
                fully_shard(module, mp_policy=policy)
        sharded: Any = fully_shard(CallThrough(model), mp_policy=policy)
        self.model = sharded
        self.optimizer = make_optimizer(sharded)
        self.trainable = [p for p in sharded.parameters() if p.requires_grad]

    def forward(self, fn: Callable, *args: Any) -> Any:
        return self.model(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None) -> float | None:
        norm = None
        if max_grad_norm:
            total = torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def unwrap(self) -> Any:
        return self.model.inner

    def gathered(self, params: list | None = None) -> ContextManager:
        return contextlib.nullcontext()  # whole weights come from whole_weights() instead

    def whole_weights(self, names: set[str] | None = None) -> WholeWeights:
        """Each weight (or only `names`) gathered in turn, copied to the main process only: torch's
        full state dict gathers all of them at once, which made saving the run's memory peak."""
        return gathering(state_tensors(self.unwrap(), names), self._gather_each)

    def _gather_each(self, entries: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.distributed.tensor import DTensor

        for name, tensor in entries:
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective
            if self.runtime.is_main and whole is not None:
                yield name, whole.detach().cpu()
            del whole

    def adapter_state_dict(self) -> dict:
        weights = self.whole_weights(adapter_tensor_names(self.unwrap()))
        return dict(weights.tensors) if weights is not None else {}

    def save_weights(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / "fsdp"))

    def load_weights(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        if not (path / "fsdp").is_dir():
            raise PhituneError(
                f"{path}: not an FSDP checkpoint (no fsdp/); resume with the distributed settings the run started with"
            )
        model_sd, optim_sd = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "fsdp"))
        # Frozen base weights are not in the checkpoint (they come from the base model): not strict.
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )


def _transformer(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_tensor_names(model: torch.nn.Module) -> set[str]:
    """Which of the model's tensors PEFT saves in an adapter, asked of PEFT itself: it is handed
    placeholders and the ones that come back are the answer. Not only the trainable ones: with an
    embedding or the output head among the targets PEFT also saves that layer's frozen base
    weight, which a trainable-only gather would leave as an empty shard (TRL #4416, PEFT #2892)."""
    from peft import get_peft_model_state_dict

    probes = {k: torch.empty(0) for k in model.state_dict()}
    by_id = {id(v): k for k, v in probes.items()}
    return {by_id[id(v)] for v in get_peft_model_state_dict(model, state_dict=probes).values() if id(v) in by_id}


def build_engine(
    strategy: str,
    *,
    model: torch.nn.Module,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    accelerator: Accelerator,
    runtime: Runtime,
    precision: str,
    deepspeed_config: dict | None,
) -> Engine:
    """The engine for `runtime.strategy`; `make_optimizer(module)` builds the optimizer on the
    parameters the engine trains (FSDP's are the sharded ones)."""
    return ENGINES[strategy](
        model=model,
        make_optimizer=make_optimizer,
        accelerator=accelerator,
        runtime=runtime,
        precision=precision,
        deepspeed_config=deepspeed_config,
    )


def _plain(*, model, make_optimizer, accelerator, runtime, **_) -> Engine:
    return PlainEngine(accelerator, model, make_optimizer(model), runtime)


def _deepspeed(*, model, make_optimizer, runtime, deepspeed_config, **_) -> Engine:
    return DeepSpeedEngine(model, make_optimizer(model), runtime, deepspeed_config)


def _fsdp(*, model, make_optimizer, runtime, precision, accelerator, **_) -> Engine:
    return FsdpEngine(model, make_optimizer, runtime, precision, accelerator.device)


ENGINES: dict[str, Callable[..., Engine]] = {"none": _plain, "ddp": _plain, "deepspeed": _deepspeed, "fsdp": _fsdp}
