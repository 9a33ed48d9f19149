"""Classification heads and DPO on the shipped scenario data, through the real CLI."""

import json

import torch

from helpers import REPO, TOY_EXAMPLE_FLAGS, run_cli


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(example: str, model, out, *extra, toy=TOY_EXAMPLE_FLAGS):
    return run_cli(
        "train",
        REPO / "examples" / example / "config.yaml",
        "--set",
        f"model.name_or_path={model}",
        "--set",
        f"output_dir={out}",
        *toy,
        *extra,
    )


def test_classification_head_beats_chance_and_loads_in_plain_peft(tiny_phi3, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "cls"
    assert _train("classification", tiny_phi3, out) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["objective"] == "classification" and run["data"]["labels"].keys() == {"negative", "neutral", "positive"}
    # Three balanced classes: chance is ~1/3.
    assert run["eval"]["accuracy"] > 0.8 and run["eval"]["macro_f1"] > 0.8
    spec = json.loads((out / "adapter" / "task.json").read_text())
    assert spec["name"] == "classification" and spec["head"] and spec["labels"] == ["negative", "neutral", "positive"]

    # Plain transformers + PEFT, no phitune: the saved adapter carries the trained head.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_phi3, num_labels=3, pad_token_id=tok.pad_token_id)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    texts = [
        "The coffee was delicious and the staff was friendly.",
        "My soup was cold and the service was rude.",
        "The table was ordinary and the tea was average.",
    ]
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    with torch.no_grad():
        preds = [model(input_ids=torch.tensor([i])).logits.argmax(-1).item() for i in ids]
    assert [spec["labels"][p] for p in preds] == ["positive", "negative", "neutral"]


def test_ner_head_finds_entities(tiny_phi3, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "ner"
    assert _train("ner", tiny_phi3, out) == 0
    ev = json.loads((out / "run.json").read_text())["eval"]
    # An untrained head finds ~no exact entity spans; most words are O, so accuracy alone proves little.
    assert ev["entity_f1"] > 0.6 and ev["accuracy"] > 0.85
    assert json.loads((out / "task.json").read_text())["labels"] == ["LOC", "ORG", "PER"]


def test_dpo_margin_grows_and_preferences_are_learned(tiny_phi3, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "dpo"
    assert _train("dpo", tiny_phi3, out, "--set", "training.log_every=1", "--max-steps", "40") == 0
    records = [r for r in _records(out) if "reward_margin" in r]
    first, last = records[0], records[-1]
    # Step 1 starts at the reference: zero margin, loss log(2).
    assert abs(first["reward_margin"]) < 1e-4 and abs(first["loss"] - 0.6931) < 1e-3
    assert last["reward_margin"] > first["reward_margin"] + 1.0
    assert sum(r["reward_accuracy"] for r in records[-5:]) / 5 > 0.8
    ev = json.loads((out / "run.json").read_text())["eval"]
    assert ev["reward_accuracy"] > 0.8 and ev["reward_margin"] > 1.0


def test_dpo_full_fine_tuning_uses_a_frozen_copy(tiny_phi3, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "dpo-full"
    assert (
        _train(
            "dpo",
            tiny_phi3,
            out,
            "--set",
            "method.name=full",
            "--set",
            "training.learning_rate=1e-3",
            "--set",
            "training.log_every=1",
            "--max-steps",
            "15",
            toy=(),  # the toy flags set method.dropout, which full fine-tuning does not read (an error)
        )
        == 0
    )
    records = _records(out)
    assert abs(records[0]["reward_margin"]) < 1e-4
    assert records[-1]["reward_margin"] > 0.5


def test_head_and_dpo_runs_resume_exactly(tiny_phi3, tmp_path, monkeypatch):
    """Stop at step 8 (checkpoint), resume to 16: the same losses as 16 steps in one go."""
    monkeypatch.chdir(REPO)
    common = [
        "--set",
        "training.lr_scheduler=constant",
        "--set",
        "training.log_every=1",
        "--set",
        "training.precision=fp32",
        "--set",
        "training.eval_every=null",
        "--set",
        "data.validation=null",
        "--set",
        "training.save_every=8",
    ]
    for example in ("classification", "dpo"):
        whole, parts = tmp_path / f"{example}-whole", tmp_path / f"{example}-parts"
        assert _train(example, tiny_phi3, whole, *common, "--max-steps", "16") == 0
        assert _train(example, tiny_phi3, parts, *common, "--max-steps", "8") == 0
        assert _train(example, tiny_phi3, parts, *common, "--max-steps", "16", "--resume") == 0
        a = [r["loss"] for r in _records(whole)]
        b = [r["loss"] for r in _records(parts)]
        assert len(a) == len(b) == 16
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, example
