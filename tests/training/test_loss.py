"""The fast loss (output head on trained positions only) against the plain computation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from phitune.data.batching import collate
from phitune.data.dataset import tokenize_file
from phitune.training.loss import token_loss

from helpers import losses, run_cli, write_config


def test_token_loss_equals_transformers_loss(tiny_phi3, chat_files):
    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    batch = collate(tokenize_file(tok, chat_files[1], 256).examples, tok.pad_token_id)
    loss_sum, n, _ = token_loss(model, batch)
    # transformers shifts labels and averages over non-ignored positions from full logits.
    reference = model(**batch).loss
    torch.testing.assert_close(loss_sum / n, reference, atol=1e-5, rtol=1e-5)
    # Gradients agree too.
    (loss_sum / n).backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model(**batch).loss.backward()
    torch.testing.assert_close(ours, model.lm_head.weight.grad, atol=1e-6, rtol=1e-4)


def test_bf16_trajectory_follows_fp32(tmp_path, tiny_phi3, chat_files):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        cfg = write_config(
            tmp_path / f"{precision}.yaml",
            tiny_phi3,
            chat_files[0],
            out,
            method={"name": "lora", "dropout": 0.0, "target_modules": ["all-linear", "lm_head"]},
            max_steps=15,
            learning_rate=3e-3,
            precision=precision,
        )
        assert run_cli("train", cfg) == 0
        runs[precision] = losses(out)
    # bf16 rounds activations to 8 bits of mantissa; the trajectory must stay within a few percent.
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=0.03)
