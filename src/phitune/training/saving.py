"""A run's weights on disk: the adapter in PEFT's format or the whole model in transformers', with
the tokenizer and task beside; sharded weights are gathered (or streamed) first, and only the main
process writes."""

from __future__ import annotations

import collections
from pathlib import Path

from phitune.methods import METHODS
from phitune.outputs import staged
from phitune.training import streamed_safetensors
from phitune.training.run import Run


def save_adapter(run: Run, path: Path) -> None:
    """The adapter in PEFT's format, tokenizer and task beside. Under ZeRO-3 every process
    gathers it; only the main one writes."""
    state_dict = run.engine.adapter_state_dict()
    if run.runtime.is_main:
        run.engine.unwrap().save_pretrained(
            path,
            state_dict=state_dict,
            path_initial_model_for_weight_conversion=str(run.initial) if run.initial else None,
        )
        run.tokenizer.save_pretrained(path)
        (path / "task.json").write_text(run.data.spec.to_json())
        method = METHODS[run.cfg.method.name]
        if method.save_extras is not None:  # QLoRA: the 4-bit base it was trained on
            method.save_extras(path, run.cfg.method)


def save_final(run: Run, name: str | None = None) -> Path:
    """OUT/adapter (PEFT format) or OUT/model (transformers format), or OUT/<name>, tokenizer
    beside; sharded weights are gathered first, and only the main process writes."""
    target = run.out / (name or ("adapter" if run.cfg.is_adapter else "model"))
    with staged(target, writer=run.runtime.is_main) as tmp:
        (save_adapter if run.cfg.is_adapter else save_whole_model)(run, tmp)
    return target


def save_whole_model(run: Run, path: Path) -> None:
    """The full fine-tune in transformers' format, tokenizer and task beside. Sharded weights are
    streamed into model.safetensors as they are gathered (no process holds the whole model),
    unless transformers would rename or convert them on saving."""
    model = run.engine.unwrap()
    model.config.use_cache = True
    weights = run.engine.whole_weights()  # a collective under sharding: every process takes part
    if weights is None or not streamed_safetensors.saved_as_is(model, weights.slots):
        whole = None if weights is None else dict(weights.tensors)
        if run.runtime.is_main:
            model.save_pretrained(path, state_dict=whole)
    elif run.runtime.is_main:
        model.save_pretrained(path, state_dict={})
        streamed_safetensors.write(path / "model.safetensors", weights.slots, weights.tensors, {"format": "pt"})
    else:
        collections.deque(weights.tensors, maxlen=0)  # this process's part of each gather
    if run.runtime.is_main:
        run.tokenizer.save_pretrained(path)
        (path / "task.json").write_text(run.data.spec.to_json())
