"""Kill a run with SIGKILL mid-training, resume it, and get the uninterrupted run's losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from helpers import losses, run_cli, write_config


def _config(path, model, data, out):
    # Dropout, gradient accumulation and epoch boundaries (64 examples / 8 = 8 steps an epoch) all
    # depend on restored state: RNG, data position and optimizer moments.
    return write_config(
        path,
        model,
        data,
        out,
        method={"name": "lora", "dropout": 0.1},
        max_steps=60,
        batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        lr_scheduler="cosine",
        warmup_steps=5,
        save_every=10,
        save_total_limit=2,
        seed=7,
    )


def _phitune(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "phitune", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # 20-60 s on 2 cores: in the slow tier, to keep the default suite within budget
def test_sigkill_and_resume_matches_uninterrupted(tmp_path, tiny_phi3, chat_files):
    reference = tmp_path / "reference"
    assert run_cli("train", _config(tmp_path / "ref.yaml", tiny_phi3, chat_files[0], reference)) == 0

    out = tmp_path / "killed"
    cfg = _config(tmp_path / "killed.yaml", tiny_phi3, chat_files[0], out)
    proc = _phitune("train", cfg)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000030").is_dir():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists()  # killed before the end
    logged_before_kill = len(losses(out))
    assert 30 <= logged_before_kill < 60

    resumed = _phitune("train", cfg, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    expected, got = losses(reference), losses(out)
    assert len(got) == len(expected) == 60
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    for step, (a, b) in enumerate(zip(expected, got), 1):
        assert abs(a - b) < 1e-5, f"step {step}: uninterrupted {a} vs resumed {b}"
    ref_w, got_w = (
        load_file(reference / "adapter" / "adapter_model.safetensors"),
        load_file(out / "adapter" / "adapter_model.safetensors"),
    )
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert (ref_w[k] - got_w[k]).abs().max() < 1e-5, k
    # Retention: only the newest two checkpoints are kept, each a usable PEFT adapter.
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000050", "step-000060"]
    assert (out / "checkpoints" / "step-000060" / "adapter" / "adapter_config.json").is_file()


def test_resume_refuses_a_changed_configuration(tmp_path, tiny_phi3, chat_files, capsys):
    out = tmp_path / "run"
    cfg = _config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], out)
    assert run_cli("train", cfg, "--set", "training.max_steps=10") == 0
    capsys.readouterr()
    assert run_cli("train", cfg, "--resume", "--set", "training.learning_rate=0.1") == 2
    assert "training.learning_rate: 0.003 -> 0.1" in capsys.readouterr().err
    # Extending the run is allowed.
    assert run_cli("train", cfg, "--resume", "--set", "training.max_steps=20") == 0
    assert len(losses(out)) == 20
