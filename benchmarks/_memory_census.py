"""One worker of distributed_memory.py --breakdown (started by torchrun): phitune's own setup and
train_step, with this process's memory read at each phase.

At each phase it reports the process's RSS and a census of the live tensors (every tensor object
the garbage collector can reach, each storage counted once), split by what holds them: the model's
parameters (under ZeRO-3 their local shards), their gradients, the optimizer's state, the
optimizer's own flat buffers (DeepSpeed keeps fp32 copies of the partitions and gradient buckets
there, by attribute name) and the rest (activations, communication buffers). RSS minus the census
is what the allocator and the libraries hold outside tensors.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/_memory_census.py CONFIG --set KEY=VALUE ...
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time

import psutil
import torch
from _memory import peak_rss_mb

from phitune.config import load_config
from phitune.data.batching import epoch_batches
from phitune.training.sft import finish, setup, train_step


def storages(obj) -> dict[int, int]:
    """{storage address: bytes} of the tensors in OBJ (a tensor, or lists / tuples / dicts of them)."""
    found: dict[int, int] = {}
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            x = getattr(x, "_local_tensor", x)  # a DTensor (FSDP2): its shard
            if x.device.type == "cpu" and x.untyped_storage().nbytes():
                found[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, (list, tuple)):
            todo += list(x)
        elif isinstance(x, dict):
            todo += list(x.values())
    return found


def census(run) -> dict[str, float]:
    model = run.engine.unwrap()
    optimizer = run.engine.optimizer
    owners: dict[str, dict[int, int]] = {}

    def claim(name: str, found: dict[int, int]) -> None:
        taken = set().union(*(set(v) for v in owners.values())) if owners else set()
        owners.setdefault(name, {}).update({k: v for k, v in found.items() if k not in taken})

    params = list(model.parameters())
    claim("parameters (local)", storages(params))
    claim("parameter shards (ZeRO-3 ds_tensor)", storages([p.ds_tensor for p in params if hasattr(p, "ds_tensor")]))
    claim("gradients", storages([p.grad for p in params if p.grad is not None]))
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's wraps ours
    inner = getattr(inner, "optimizer", inner)  # accelerate's wraps torch's
    claim("optimizer state", storages([s for s in inner.state.values()]))
    for name, value in sorted(vars(optimizer).items()):
        found = storages(value)
        if found:
            claim(f"DeepSpeed optimizer .{name}", found)
    everything: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            everything.update(storages(obj))
    claimed = set().union(*(set(v) for v in owners.values()))
    owners["other live tensors"] = {k: v for k, v in everything.items() if k not in claimed}
    out = {k: sum(v.values()) / 2**20 for k, v in owners.items() if v}
    out["all live tensors"] = sum(everything.values()) / 2**20
    return out


def main() -> None:
    config, sets = sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]
    cfg = load_config(config, sets)
    proc = psutil.Process()
    phases = []

    def phase(name: str, run) -> None:
        gc.collect()
        phases.append({"phase": name, "rss_mb": proc.memory_info().rss / 2**20, "hwm_mb": peak_rss_mb(), **census(run)})

    samples: list[tuple[float, float]] = []
    threading.Thread(target=_sample, args=(samples, proc), daemon=True).start()
    run = setup(cfg, resume=False, overwrite=True)
    phase("after setup (model loaded, engine built)", run)
    t = run.cfg.training
    lengths = [len(e.input_ids) for e in run.data.train_examples]
    batches = epoch_batches(lengths, t.batch_size, t.seed, 0, False)
    run.engine.model.train()
    # Where in a step the peak falls: the last forward's end and the optimizer's start, by hooks.
    marks: dict[str, float] = {}
    run.engine.unwrap().get_output_embeddings().register_forward_hook(
        lambda *_: marks.__setitem__("forward", time.time())
    )
    torch_optimizer = run.engine.optimizer
    while hasattr(torch_optimizer, "optimizer"):  # DeepSpeed's and accelerate's wrap torch's
        torch_optimizer = torch_optimizer.optimizer
    torch_optimizer.register_step_pre_hook(lambda *_: marks.__setitem__("backward", time.time()))
    within = []
    for i in range(3):
        start = time.time()
        train_step(run, [run.data.train_examples[j] for j in batches[i]])
        end = time.time()
        spans = (("forward", start, marks["forward"]), ("backward", marks["forward"], marks["backward"]))
        spans += (("optimizer step", marks["backward"], end),)
        within.append({name: max((r for t, r in samples if a <= t <= b), default=0.0) for name, a, b in spans})
        phase(f"after optimizer step {i + 1}", run)
    start = time.time()
    finish(run)  # the final weights saved: under sharding they are gathered first
    end = time.time()
    saving = max((r for t, r in samples if start <= t <= end), default=0.0)
    report = {"rank": run.runtime.rank, "phases": phases, "peak_rss_within_step": within, "peak_rss_saving": saving}
    # One write of one whole line: both processes share the pipe, and print() writes in pieces.
    os.write(1, f"\nCENSUS {json.dumps(report)}\n".encode())


def _sample(samples: list, proc: psutil.Process) -> None:
    while True:
        samples.append((time.time(), proc.memory_info().rss / 2**20))
        time.sleep(0.002)


if __name__ == "__main__":
    main()
