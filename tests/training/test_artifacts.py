"""Differential tests: phitune's adapter in plain PEFT, the merged model, and generation."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from phitune.data.batching import collate
from phitune.data.chat import IGNORE_INDEX
from phitune.data.dataset import tokenize_file
from phitune.models import load_for_inference

from helpers import DEMO_TRAIN, logits, run_cli, write_config

METHODS = {
    "lora": {"name": "lora", "dropout": 0.1},
    "dora": {"name": "dora"},
    "ia3": {"name": "ia3"},
}


@pytest.fixture(scope="module")
def trained(tiny_phi3, chat_files, tmp_path_factory):
    runs = {}
    for name, method in METHODS.items():
        root = tmp_path_factory.mktemp(name)
        cfg = write_config(
            root / "c.yaml",
            tiny_phi3,
            chat_files[0],
            root / "out",
            method=method,
            validation=chat_files[1],
            max_steps=15,
            learning_rate=1e-2,
        )
        assert run_cli("train", cfg) == 0
        runs[name] = root / "out"
    return runs


def _batch(tokenizer, path):
    ds = tokenize_file(tokenizer, path, 256)
    return collate(ds.examples, tokenizer.pad_token_id)


def _textbook_loss(logits, batch) -> float:
    """Mean cross-entropy over labelled positions, computed the plain way from full logits."""
    labels = batch["labels"][:, 1:]
    return float(
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_adapter_loads_in_plain_peft_with_same_logits(name, trained, tiny_phi3, chat_files):
    out = trained[name]
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3)
    batch = _batch(tokenizer, chat_files[1])
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32).eval()
    base_logits = logits(base, batch)
    plain_logits = logits(PeftModel.from_pretrained(base, out / "adapter").eval(), batch)
    our_logits = logits(load_for_inference(str(out))[0], batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(plain_logits[real], our_logits[real], atol=1e-5, rtol=1e-5)
    # The adapter is not empty: it changes the model's predictions.
    assert (plain_logits[real] - base_logits[real]).abs().max() > 1e-2
    # phitune's eval loss (head applied to trained positions only) equals the textbook computation.
    reported = json.loads((out / "run.json").read_text())["eval"]["loss"]
    assert abs(_textbook_loss(plain_logits, batch) - reported) < 1e-4


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merged_model_matches_base_plus_adapter(name, trained, tiny_phi3, chat_files, tmp_path):
    out = trained[name]
    merged_dir = tmp_path / "merged"
    assert run_cli("merge", out, "--output", merged_dir) == 0
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = _batch(tokenizer, chat_files[1])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    a = logits(merged, batch)
    b = logits(load_for_inference(str(out))[0], batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)
    assert not any(k.startswith("base_model") for k in merged.state_dict())
    assert run_cli("merge", out, "--output", merged_dir) == 2  # refuses to overwrite


def test_full_finetune_writes_a_transformers_model(tiny_phi3, chat_files, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], tmp_path / "out", method="full", max_steps=3)
    assert run_cli("train", cfg) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed
    assert run_cli("merge", tmp_path / "out", "--output", tmp_path / "m") == 2  # nothing to merge


@pytest.mark.slow  # the real-model tier covers this path in the default suite
def test_generate_answers_with_the_fine_tuned_behaviour(tiny_phi3, tmp_path, capsys):
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        DEMO_TRAIN,
        tmp_path / "out",
        method={"name": "lora", "dropout": 0.0, "target_modules": ["all-linear", "lm_head"]},
        max_steps=400,
        batch_size=16,
        learning_rate=3e-3,
        lr_scheduler="cosine",
        log_every=50,
    )
    assert run_cli("train", cfg) == 0
    capsys.readouterr()
    assert run_cli("generate", tmp_path / "out", "--prompt", "Hi, what is the wifi password?") == 0
    assert capsys.readouterr().out.strip() == "The wifi network is PhiCafe and the password is on your receipt."
    # Without the adapter, the untrained base says something else entirely.
    assert run_cli("generate", tiny_phi3, "--prompt", "Hi, what is the wifi password?") == 0
    assert capsys.readouterr().out.strip() != "The wifi network is PhiCafe and the password is on your receipt."
    # An adapter dir given explicitly works the same as the run dir.
    assert run_cli("generate", tiny_phi3, "--adapter", tmp_path / "out" / "adapter", "--prompt", "where are you?") == 0
    assert capsys.readouterr().out.strip() == "We are at 12 Harbour Street, next to the library."


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_lora_inits_give_adapters_for_the_original_base(init, tiny_phi3, chat_files, tmp_path):
    """PiSSA/OLoRA rewrite the base at init; the saved adapter must still fit the untouched base."""
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        chat_files[0],
        out,
        method={"name": "lora", "init": init, "r": 4, "dropout": 0.0},
        validation=chat_files[1],
        max_steps=10,
        learning_rate=1e-2,
    )
    assert run_cli("train", cfg) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3)
    batch = _batch(tokenizer, chat_files[1])
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32).eval()
    loss = _textbook_loss(logits(PeftModel.from_pretrained(base, out / "adapter").eval(), batch), batch)
    reported = json.loads((out / "run.json").read_text())["eval"]["loss"]
    assert abs(loss - reported) < 1e-3, (init, loss, reported)
