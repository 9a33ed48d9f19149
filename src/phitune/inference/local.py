"""The engine inside this process, for one-off generation: `phitune generate` and `chat`, and the
answers `eval`, `compare` and training's task metric score. The model may carry a PEFT LoRA
adapter (taken from it as it is in memory). What the engine cannot run (another architecture, a
non-LoRA adapter, a model sharded over processes) is answered None, and the caller generates
with transformers instead."""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Iterator

import torch

from phitune.inference.engine import Engine, Event
from phitune.inference.kv import BLOCK, KVPool
from phitune.inference.limits import Limits
from phitune.inference.lora import LoraSet, NotBatchable, from_peft
from phitune.inference.runner import attention_shape, unsupported
from phitune.inference.sampling import Sampling

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("phitune")


def local_engine(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_batch: int, tokens: int
) -> tuple[Engine, LoraSet | None] | None:
    """An engine over `model` with room for `max_batch` sequences of `tokens` tokens, and the
    model's own LoRA adapter; None when the engine cannot run this model."""
    why = unsupported(model)
    if why is None and any(type(m).__name__ == "ModulesToSaveWrapper" for m in model.modules()):
        why = "an adapter that replaces whole modules"
    if why is None and _sharded(model):
        why = "weights sharded over processes"
    lora = None
    if why is None:
        try:
            lora = from_peft(model)
        except NotBatchable as exc:
            why = str(exc)
    if why is not None:
        log.debug("generating with transformers: the engine does not run %s", why)
        return None
    per_token = _kv_bytes_per_token(model)
    budget = max_batch * (-(-tokens // BLOCK) + 1) * BLOCK * per_token
    limits = Limits(max_batch=max_batch, max_step_tokens=max(256, max_batch), kv_cache_mb=-(-budget // 2**20))
    # Not packed: a packed copy of the weights would double the model's memory for one evaluation
    # or one chat session (the service's engine packs: it lives long and serves many).
    return Engine(model, tokenizer, limits=limits, pack=False), lora


def _sharded(model: Any) -> bool:
    """FSDP2's DTensors or ZeRO-3's partitioned parameters: only their framework's forward gathers them."""
    return any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters())


def _kv_bytes_per_token(model: Any) -> int:
    """In fp32 whatever the model's dtype: a bound, so the budget always holds the batch."""
    _, kv_heads, head_dim = attention_shape(model.config)
    return KVPool.token_bytes(model.config.num_hidden_layers, kv_heads, head_dim, torch.float32)


def generate_all(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str] | None:
    """One reply per prompt (token ids), generated together; None when the engine cannot run the
    model. Request i is seeded with seed + i."""
    made = local_engine(model, tokenizer, max_batch=batch_size, tokens=max(map(len, prompts)) + max_new_tokens)
    if made is None:
        return None
    engine, lora = made
    texts = [""] * len(prompts)
    errors: list[str] = []
    left = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event: Event) -> None:
            if event.kind == "text":
                texts[i] += event.text
            else:
                if event.kind == "error":
                    errors.append(event.text)
                left.release()

        return sink

    try:
        for i, ids in enumerate(prompts):
            sampling = Sampling(temperature=temperature, seed=seed + i, max_tokens=max_new_tokens)
            engine.submit(ids, sampling, sink_for(i), adapter=lora)
        for _ in prompts:
            left.acquire()
    finally:
        engine.close()
    if errors:
        from phitune.errors import PhituneError

        raise PhituneError(f"generation failed: {errors[0]}")
    return [t.strip() for t in texts]


def stream_one(
    engine: Engine,
    lora: LoraSet | None,
    prompt: list[int],
    sampling: Sampling,
    cancel: threading.Event | None = None,
) -> Iterator[str]:
    """A reply's text pieces as the engine makes them; closing the iterator or setting `cancel`
    ends the request at the next step."""
    pieces: queue.Queue[Event] = queue.Queue()
    handle = engine.submit(prompt, sampling, pieces.put, adapter=lora)
    try:
        while True:
            try:
                event = pieces.get(timeout=0.1)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    return
                continue
            if event.kind == "text":
                yield event.text
            elif event.kind == "error":
                from phitune.errors import PhituneError

                raise PhituneError(f"generation failed: {event.text}")
            else:
                return
    finally:
        handle.cancel()
