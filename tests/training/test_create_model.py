import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from phitune.create_model import create_model

from helpers import run_cli


@pytest.mark.parametrize(
    "arch,cls",
    [
        ("phi3", "Phi3ForCausalLM"),
        ("llama", "LlamaForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ],
)
def test_each_arch_builds_loads_and_is_labelled_untrained(model_cache, arch, cls):
    path = model_cache(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == cls
    assert model.config.phitune_untrained is True
    assert "UNTRAINED" in (path / "README.md").read_text()
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_phi3_keeps_onnx_builder_friendly_rope(model_cache):
    cfg = json.loads((model_cache("phi3") / "config.json").read_text())
    assert cfg["original_max_position_embeddings"] == cfg["max_position_embeddings"]


def test_small_preset_is_about_30m_parameters(tmp_path):
    summary = create_model(tmp_path / "small", "phi3", "small")
    assert 25e6 < summary["parameters"] < 35e6


def test_tokenizer_trains_on_a_user_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zygomorphic xylophones " * 50 + "\n" + "plain words here\n" * 20)
    assert run_cli("create-model", tmp_path / "m", "--arch", "llama", "--corpus", corpus) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert len(tok.tokenize("zygomorphic xylophones")) <= 3  # learned merges from this corpus
    assert run_cli("create-model", tmp_path / "m") == 2  # refuses to overwrite
