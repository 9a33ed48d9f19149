"""What a new user meets first (issue 18): a failing generation ends instead of hanging, nonsense
options are refused at once, a typo'd path is answered in a second, a missing CSV column is one
error with the fix, max_length cuts are loud, and errors name the flag a value came from."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from helpers import run_cli, write_config

ONE_LINE = 1  # an error is one line on stderr


def _phitune(*args, cwd=None, env=None, timeout=60):
    proc = subprocess.run(
        [sys.executable, "-m", "phitune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_an_error_inside_generation_ends_the_stream(tiny_phi3):
    """An error while generating used to leave the reader waiting forever (transformers' generate()
    raising in its streaming thread). It ends the stream with a one-line error; the engine refuses
    a token id past the vocabulary at once (in a batch it would fail every request's step) and
    serves on."""
    from phitune.backends import TorchBackend
    from phitune.errors import PhituneError
    from phitune.inference.local import stream_one
    from phitune.inference.sampling import Sampling
    from phitune.models import load_for_inference

    backend = TorchBackend(*load_for_inference(str(tiny_phi3)))
    engine, lora = backend._local()
    vocab = backend.model.config.vocab_size
    outcome = []

    def read():
        try:
            outcome.append("".join(backend._stream_transformers([1, 2, 3], 0, 0.0, 0, 1.0, None)))
        except PhituneError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream hangs after generate() raised"
    assert isinstance(outcome[0], PhituneError) and "generation failed" in str(outcome[0]), outcome
    with pytest.raises(PhituneError, match="outside the vocabulary"):
        next(stream_one(engine, lora, [1, vocab + 5], Sampling(max_tokens=4)))
    assert "".join(backend.stream([{"role": "user", "content": "hi"}], max_new_tokens=3))  # the engine serves on


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "M", "--prompt", "hi", "--max-new-tokens", "0"),
        ("generate", "M", "--prompt", "hi", "--max-new-tokens", "-3"),
        ("chat", "M", "--max-new-tokens", "0"),
        ("chat", "M", "--temperature", "-1"),
        ("generate", "M", "--prompt", "hi", "--temperature", "nan"),
        ("eval", "M", "--data", "x.jsonl", "--limit", "0"),
    ],
)
def test_nonsense_options_are_refused_in_one_line(tiny_phi3, args):
    proc = _phitune(*[str(tiny_phi3) if a == "M" else a for a in args], timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == ONE_LINE and "must be" in lines[0], proc.stderr


@pytest.mark.parametrize(
    "path,suggested",
    [("models/does-not-exist", None), ("./models/does-not-exist", None), ("runs/lora-suport", "runs/lora-support")],
)
def test_a_typo_in_a_model_path_is_answered_at_once(tmp_path, path, suggested):
    (tmp_path / "models" / "tiny-phi3").mkdir(parents=True)
    (tmp_path / "runs" / "lora-support").mkdir(parents=True)
    for env in ({}, {"HF_HUB_OFFLINE": "1"}):
        started = time.time()
        proc = _phitune("generate", path, "--prompt", "hi", cwd=tmp_path, env=env, timeout=60)
        took = time.time() - started
        assert proc.returncode == 2 and "is not a directory here" in proc.stderr and "check the path" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and took < 2.5, (took, proc.stderr)
        assert (suggested in proc.stderr) if suggested else "did you mean" not in proc.stderr


def test_a_typo_in_train_is_answered_before_loading(tmp_path, chat_files):
    (tmp_path / "models" / "tiny-phi3").mkdir(parents=True)
    cfg = write_config(tmp_path / "c.yaml", "models/tiny-phi", chat_files[0], tmp_path / "out")
    started = time.time()
    proc = _phitune("train", cfg, cwd=tmp_path)
    assert proc.returncode == 2 and "did you mean models/tiny-phi3?" in proc.stderr and time.time() - started < 10


def test_a_missing_csv_column_is_one_error_with_the_mapping(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text("review,sentiment\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(39)))
    assert run_cli("data", "validate", data, "--task", "classification") == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "review, sentiment" in errors[0], out
    assert "task.fields: {text: review, label: sentiment}" in errors[0]
    assert (
        run_cli(
            "data",
            "validate",
            data,
            "--task",
            "classification",
            "--set",
            "task.fields.text=review",
            "--set",
            "task.fields.label=sentiment",
        )
        == 0
    )
    assert "39 examples, 0 error(s)" in capsys.readouterr().out


def test_max_length_cuts_are_loud_and_refused_past_the_limit(tiny_phi3, chat_files, tmp_path, capsys, caplog):
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], tmp_path / "out", max_steps=1)
    assert run_cli("train", cfg, "--set", "data.max_length=16") == 2
    err = capsys.readouterr().err
    assert "data.max_length=16" in err and "would keep 99% whole" in err and "data.max_dropped" in err
    assert not (tmp_path / "out" / "adapter").exists()
    caplog.clear()
    assert run_cli("train", cfg, "--set", "data.max_length=16", "--set", "data.max_dropped=1", "--overwrite") == 0
    assert any("WARNING" in r.getMessage() and "drops" in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert run_cli("train", cfg, "--overwrite") == 0  # max_length 256: nothing cut, nothing loud
    assert not any("WARNING" in r.getMessage() for r in caplog.records)


def test_errors_name_the_flag_a_value_came_from(tiny_phi3, chat_files, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], tmp_path / "out")
    assert run_cli("train", cfg, "--set", "training.learning_rate=-1", "--method", "lorra") == 2
    err = capsys.readouterr().err
    assert "--set training.learning_rate=-1: training.learning_rate" in err and "--method lorra: method.name" in err
    assert f"{cfg}:" not in err.split("\n", 1)[1]  # no line of the file is blamed
    for flag, hint in (
        ("--lr", "--set training.learning_rate=VALUE"),
        ("--max-stepz", "did you mean --max-steps?"),
        ("--batch-size", "--set training.batch_size=VALUE"),
    ):
        proc = _phitune("train", cfg, flag, "3")
        assert proc.returncode == 2 and hint in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_demo_hint_is_a_command_this_shell_can_run(monkeypatch, tmp_path):
    import shutil as sh

    from phitune.demo import phitune_command

    monkeypatch.setenv("PATH", str(tmp_path))  # no phitune on PATH, as after `make demo` without activating .venv
    command = phitune_command()
    assert command != "phitune" and sh.which(command.split()[0]), command
    (tmp_path / "phitune").write_text("#!/bin/sh\n")
    (tmp_path / "phitune").chmod(0o755)
    assert phitune_command() == "phitune"


def test_the_toy_demo_runs_the_same_job_in_seconds(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--toy", "--output", out, "--max-steps", "5") == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert report["train_loss_last"][0] == 5 and report["after"]["loss"] < report["before"]["loss"]
    assert "held-out replies" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # one base model or the other, refused by the parser
        run_cli("demo", "--toy", "--model", "x")
    assert refused.value.code == 2 and "not allowed with argument --toy" in capsys.readouterr().err
