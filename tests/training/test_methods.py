"""Each method, through the real CLI on a tiny model: the loss falls clearly on a learnable task."""

import json

import pytest

from helpers import losses, run_cli, write_config

# Per-method learning rates: IA3 and prompt tuning train few parameters and need a larger step.
METHODS = {
    "full": ({"name": "full"}, 3e-3),
    "lora": ({"name": "lora", "target_modules": ["all-linear", "lm_head"]}, 3e-3),
    "dora": ({"name": "dora", "target_modules": ["all-linear", "lm_head"]}, 1e-2),
    "qlora": ({"name": "qlora", "target_modules": ["all-linear", "lm_head"]}, 3e-3),
    "ia3": ({"name": "ia3", "target_modules": ["all-linear", "lm_head"]}, 3e-1),
    "prompt_tuning": ({"name": "prompt_tuning", "num_virtual_tokens": 8}, 3e-1),
}
# The fraction of the first loss the mean of the last 5 must fall below within 40 steps (measured:
# full 0.12, lora 0.39, dora 0.58, qlora 0.37, ia3 0.48). Prompt tuning barely moves a random base
# model (0.99): only that it trains at all is asserted.
TARGET = {"full": 0.5, "lora": 0.55, "dora": 0.7, "qlora": 0.55, "ia3": 0.65, "prompt_tuning": 0.998}


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_falls(name, tmp_path, tiny_phi3, chat_files):
    method, lr = METHODS[name]
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        chat_files[0],
        out,
        method=method,
        validation=chat_files[1],
        max_steps=40,
        learning_rate=lr,
        eval_every=20,
        lr_scheduler="constant",
    )
    assert run_cli("train", cfg) == 0
    trace = losses(out)
    assert len(trace) == 40
    tail = sum(trace[-5:]) / 5
    print(f"{name}: loss {trace[0]:.3f} -> last-5 mean {tail:.3f} (ratio {tail / trace[0]:.2f})")
    assert tail < TARGET[name] * trace[0], f"{name}: first {trace[0]:.3f}, last-5 mean {tail:.3f}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_second"} <= set(records[0])
    assert "eval_loss" in records[19] and "eval_perplexity" in records[39] and "eval_mean_token_accuracy" in records[39]
    artifact = out / ("model" if name == "full" else "adapter")
    assert (artifact / ("model.safetensors" if name == "full" else "adapter_model.safetensors")).is_file()
    assert (artifact / "tokenizer.json").is_file()
    for f in ("config.yaml", "README.md", "run.json", "metrics.jsonl"):
        assert (out / f).is_file()
