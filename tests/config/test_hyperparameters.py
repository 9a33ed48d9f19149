"""`auto` hyperparameters: the rules, the config that defaults to them, a run that records its
choice, and the service and KAITO manifest resolving them the same way."""

import json
import math

import pytest
import yaml

from phitune.config import parse_config
from phitune.errors import PhituneError
from phitune.training import hyperparameters as auto

from helpers import REPO, run_cli


@pytest.mark.parametrize("examples, batch", [(10, 4), (40, 4), (300, 8), (2000, 16), (5000, 32), (10**6, 32)])
def test_batch_size_grows_with_the_square_root_of_the_examples(examples, batch):
    assert auto.auto_batch_size(examples) == batch


def test_batch_size_is_a_multiple_of_processes_times_accumulation():
    assert auto.auto_batch_size(300, multiple=3) == 9 and auto.auto_batch_size(300, multiple=8) == 8


@pytest.mark.parametrize(
    "examples, tokens, batch, epochs",
    [
        (300, None, 8, 3.0),  # the usual three passes
        (20, None, 4, 10.0),  # tiny: ~60 steps would need 12 epochs; at most 10
        (100, None, 4, 3.0),
        (20000, None, 32, 1.25),  # past 25,000 examples seen: fewer passes
        (200000, None, 32, 1.0),  # never below one
        (5000, 10_000_000, 32, 2.0),  # 20M tokens seen is enough
    ],
)
def test_epochs(examples, tokens, batch, epochs):
    assert auto.auto_epochs(examples, tokens, batch) == epochs


def test_learning_rate_falls_with_width_and_follows_the_method():
    assert auto.auto_learning_rate(576, "lora", "sft") == 1e-3  # SmolLM2-135M, where it was measured
    assert auto.auto_learning_rate(3072, "qlora", "sft") == 1.9e-4  # Phi-3-mini: the usual hand-set 2e-4
    assert auto.auto_learning_rate(3072, "full", "sft") == 1.9e-5
    assert auto.auto_learning_rate(3072, "lora", "dpo") == 1.9e-5
    assert auto.auto_learning_rate(64, "lora", "sft") == 2e-3  # clipped for toy widths
    assert auto.auto_learning_rate(64, "prompt_tuning", "sft") == 2e-2
    assert auto.auto_learning_rate(None, "lora", "sft") == 1e-3


def test_the_config_defaults_to_auto_and_max_steps_overrides_auto_epochs(tmp_path):
    (tmp_path / "t.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    base = {"model": str(tmp_path), "data": str(tmp_path / "t.jsonl")}
    t = parse_config(base).training
    assert (t.epochs, t.batch_size, t.learning_rate) == ("auto", "auto", "auto")
    assert parse_config(base | {"training": {"max_steps": 5}}).training.max_steps == 5  # epochs auto: no conflict
    with pytest.raises(PhituneError) as err:
        parse_config(base | {"training": {"max_steps": 5, "epochs": 2}})
    assert "set either training.max_steps (5) or training.epochs (2), not both" in "".join(err.value.problems)
    with pytest.raises(PhituneError) as err:  # one line for the key, not one per member of 'auto' | integer
        parse_config(base | {"training": {"batch_size": "big", "learning_rate": -1}})
    assert err.value.problems == [
        "config: training.batch_size: input should be 'auto' or a valid integer (got 'big')",
        "config: training.learning_rate: input should be 'auto' or greater than 0 (got -1)",
    ]


def test_a_run_with_only_model_data_and_task_uses_and_records_the_auto_choice(tiny_phi3, chat_files, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_phi3),
                "data": str(chat_files[0]),
                "task": "chat",
                "training": {"precision": "fp32", "log_every": 100},
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    assert run_cli("train", cfg) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    h = run["hyperparameters"]
    # 64 conversations: batch 4 (sqrt(64) / 2), 60 steps need 3.75 -> 4 epochs; toy width 64 -> the 2e-3 ceiling.
    assert (h["epochs"], h["batch_size"], h["learning_rate"]) == (4.0, 4, 2e-3)
    assert h["auto"]["why"].startswith("64 examples, ") and "hidden size 64, lora" in h["auto"]["why"]
    assert run["steps"] == 4 * math.ceil(64 / 4)
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["training"]
    assert saved["learning_rate"] == "auto" and saved["epochs"] == "auto"  # a re-run re-chooses from its data
    assert "learning_rate: 0.002" in (tmp_path / "out" / "README.md").read_text()  # the run card shows the value used


def test_explicit_values_are_kept_and_nothing_is_recorded_as_auto(tiny_phi3, chat_files, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_phi3),
                "data": str(chat_files[0]),
                "output_dir": str(tmp_path / "out"),
                "training": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-4, "precision": "fp32"},
            }
        )
    )
    assert run_cli("train", cfg) == 0
    h = json.loads((tmp_path / "out" / "run.json").read_text())["hyperparameters"]
    assert h == {"epochs": None, "batch_size": 8, "learning_rate": 1e-4, "max_steps": 2, "auto": {}}


def test_kaito_resolves_auto_from_the_local_rows_and_the_presets_width(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    train = REPO / "examples/data/support_train.jsonl"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": "microsoft/Phi-3-mini-4k-instruct",
                "method": "qlora",
                "data": {"train": str(train), "validation_split": 0.1},
                "output_dir": str(tmp_path / "r"),
            }
        )
    )
    io = [
        "--input-url",
        "https://example.com/train.jsonl",
        "--output-image",
        "acr.example.io/phi3:1",
        "--push-secret",
        "acr",
    ]
    assert run_cli("kaito", cfg, "--output", tmp_path / "k", *io) == 0
    args = yaml.safe_load(
        yaml.safe_load((tmp_path / "k" / "configmap.yaml").read_text())["data"]["training_config.yaml"]
    )
    args = args["training_config"]["TrainingArguments"]
    rows = sum(1 for line in train.read_text().splitlines() if line.strip())
    assert args["learning_rate"] == 1.9e-4
    assert args["per_device_train_batch_size"] == auto.auto_batch_size(rows)
    assert args["num_train_epochs"] == auto.auto_epochs(rows, None, auto.auto_batch_size(rows))


def test_kaito_names_what_auto_cannot_resolve(tmp_path, capsys):
    cfg, placeholder = tmp_path / "cfg.yaml", tmp_path / "train.jsonl"
    placeholder.write_text("")  # the data KAITO reads is at --input-url; nothing here to count
    cfg.write_text(
        yaml.safe_dump(
            {"model": "microsoft/Phi-3-mini-4k-instruct", "data": str(placeholder), "output_dir": str(tmp_path / "r")}
        )
    )
    io = [
        "--input-url",
        "https://example.com/train.jsonl",
        "--output-image",
        "acr.example.io/phi3:1",
        "--push-secret",
        "acr",
    ]
    assert run_cli("kaito", cfg, "--output", tmp_path / "k", *io) == 2
    err = capsys.readouterr().err
    assert "training.batch_size / training.epochs: auto counts the examples of data.train" in err and "set both" in err
    assert not (tmp_path / "k").exists()


def test_the_service_chooses_auto_by_the_same_rules():
    from phitune.serve.jobconfig import choose_hyperparameters

    chosen = choose_hyperparameters({"n_epochs": "auto", "batch_size": "auto"}, 40)
    # sqrt(40) / 2 -> batch 4; 40 examples in batches of 4 reach ~60 steps in 6 epochs.
    assert chosen["batch_size"] == auto.auto_batch_size(40) == 4
    assert chosen["n_epochs"] == auto.auto_epochs(40, None, 4) == 6
    assert chosen["learning_rate_multiplier"] == 1.0
    asked = choose_hyperparameters({"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 0.5}, 40)
    assert asked == {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 0.5}


def test_model_width_from_many_threads_at_once(tiny_phi3):
    """The service's worker asks from two threads at once (its validation lane and its training
    loop): transformers' lazy import, the first time, must not fail one of them. In a fresh
    interpreter, where transformers is not imported yet."""
    import subprocess
    import sys

    script = (
        "import sys, threading\n"
        "from phitune.training.hyperparameters import model_width\n"
        "gate, out = threading.Barrier(8), []\n"
        "def ask():\n"
        "    gate.wait(); out.append(model_width(sys.argv[1]))\n"
        "threads = [threading.Thread(target=ask) for _ in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(out)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tiny_phi3)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == str([64] * 8), done.stderr[-2000:]
