"""The training loop's options, each with an observable effect."""

import json
import math

import pytest
import torch

from phitune.config import parse_config
from phitune.training.setup import build_scheduler

from helpers import losses, run_cli, write_config


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_phi3, chat_files):
    runs = {}
    for gc in (False, True):
        out = tmp_path / f"gc-{gc}"
        cfg = write_config(
            tmp_path / f"{gc}.yaml",
            tiny_phi3,
            chat_files[0],
            out,
            method={"name": "lora", "dropout": 0.0},
            max_steps=5,
            gradient_checkpointing=gc,
        )
        assert run_cli("train", cfg) == 0
        runs[gc] = losses(out)
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_phi3, chat_files):
    # The loss is normalised by the trained tokens of the whole step, so splitting changes nothing.
    runs = {}
    for accum in (1, 4):
        out = tmp_path / f"acc-{accum}"
        cfg = write_config(
            tmp_path / f"{accum}.yaml",
            tiny_phi3,
            chat_files[0],
            out,
            method={"name": "lora", "dropout": 0.0},
            max_steps=5,
            batch_size=8,
            gradient_accumulation_steps=accum,
        )
        assert run_cli("train", cfg) == 0
        runs[accum] = losses(out)
    assert runs[4] == pytest.approx(runs[1], abs=1e-5)


def test_bf16_autocast_on_cpu_trains(tmp_path, tiny_phi3, chat_files):
    out = tmp_path / "bf16"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        chat_files[0],
        out,
        method={"name": "lora", "target_modules": ["all-linear", "lm_head"]},
        max_steps=30,
        learning_rate=3e-3,
        precision="bf16",
        lr_scheduler="constant",
    )
    assert run_cli("train", cfg) == 0
    trace = losses(out)
    assert sum(trace[-5:]) / 5 < 0.6 * trace[0]


def test_epochs_count_whole_passes_and_validation_split(tmp_path, tiny_phi3, chat_files):
    out = tmp_path / "ep"
    cfg = write_config(
        tmp_path / "c.yaml", tiny_phi3, chat_files[0], out, max_steps=None, epochs=2, batch_size=10, eval_every=100
    )
    raw = json.loads(cfg.read_text())
    raw["data"]["validation_split"] = 0.25
    raw["training"].pop("max_steps")
    cfg.write_text(json.dumps(raw))
    assert run_cli("train", cfg) == 0
    run = json.loads((out / "run.json").read_text())
    # 64 examples, 16 held out -> 48 train -> 5 batches of 10 per epoch -> 10 steps.
    assert run["train_examples"] == 48 and run["steps"] == 10 and run["epochs_completed"] == 2
    assert "eval_loss" in _records(out)[-1]


def test_run_json_says_where_the_start_up_went(tmp_path, tiny_phi3, chat_files):
    out = tmp_path / "su"
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], out, max_steps=2)
    raw = json.loads(cfg.read_text())
    raw["training"]["save_every"] = 2
    cfg.write_text(json.dumps(raw))
    assert run_cli("train", cfg) == 0
    startup = json.loads((out / "run.json").read_text())["startup_s"]
    phases = ["imports_and_config", "accelerator_and_output_dir", "tokenizer_and_data", "model", "engine_and_resume"]
    assert list(startup) == [*phases, "first_step_done", "first_checkpoint_written"]
    assert all(startup[k] >= 0 for k in startup) and startup["model"] > 0
    # Milestones count from the process's start: after every phase, the checkpoint after the first step.
    assert sum(startup[k] for k in phases) <= startup["first_step_done"] + 0.05
    assert startup["first_step_done"] <= startup["first_checkpoint_written"]


def test_early_stopping_stops_when_eval_loss_stalls(tmp_path, tiny_phi3, chat_files):
    out = tmp_path / "es"
    # A learning rate of zero after warmup cannot improve eval_loss: stop after `patience` evals.
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        chat_files[0],
        out,
        validation=chat_files[1],
        max_steps=50,
        learning_rate=1e-9,
        eval_every=2,
        early_stopping_patience=2,
        lr_scheduler="constant",
    )
    assert run_cli("train", cfg) == 0
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert steps < 50
    evals = [r["eval_loss"] for r in _records(out) if "eval_loss" in r]
    assert len(evals) >= 3


def test_8bit_adamw_from_bitsandbytes(tmp_path, tiny_phi3, chat_files):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "opt"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        chat_files[0],
        out,
        method="full",
        max_steps=20,
        optimizer="adamw_8bit",
        learning_rate=3e-3,
    )
    assert run_cli("train", cfg) == 0
    trace = losses(out)
    assert sum(trace[-3:]) / 3 < 0.8 * trace[0]


def test_tensorboard_events_when_installed(tmp_path, tiny_phi3, chat_files):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], out, max_steps=2, tensorboard="on")
    assert run_cli("train", cfg) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
        (
            "cosine",
            [1 / 3, 2 / 3, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0],
        ),
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_schedules_with_warmup(tmp_path, kind, expected, chat_files):
    cfg = parse_config(
        {
            "model": str(tmp_path),
            "data": str(chat_files[0]),
            "training": {"warmup_steps": 2, "lr_scheduler": kind, "learning_rate": 1.0},
        }
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg, opt, total_steps=6)
    seen = []
    for _ in range(8):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected)


def test_metrics_are_read_while_a_run_writes_them(tmp_path):
    from phitune.training.tracking import read_metrics

    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # not written yet
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]  # the half line is left out
