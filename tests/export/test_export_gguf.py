"""`phitune export gguf` on tiny models of every architecture it writes: read back by readers that
are not ours (transformers' GGUF loader, `phitune import gguf`, and llama.cpp itself where
llama-cpp-python is installed, as CI installs it), the LoRA form equal to the merged one, the
Ollama template equal to the Jinja one, and bad input refused in one line with nothing written."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import needs_llama_cpp, run_cli, write_config

ARCHS = ["llama", "qwen2", "phi3", "mistral"]
TEXT = "Hello world, the cup is hot. 12345 numbers!\nA second line."


def _export(capsys, *args) -> tuple[int, str]:
    code = run_cli("export", "gguf", *args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _ids(model_dir) -> list[int]:
    return AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"]


@torch.no_grad()
def _torch_logits(model, ids) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


def _llama_logits(folder, ids, *, n_ctx=128, f32_cache=True) -> np.ndarray:
    """llama.cpp's logits for every position of `ids`, from the export in `folder`."""
    from phitune.export.gguf_check import open_llama

    llm = open_llama(folder, n_ctx=n_ctx, f32_cache=f32_cache)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()


def _adapter(base_dir, out, *, seed=0):
    """A LoRA with random A and B on every linear layer, rsLoRA and a per-layer alpha: the scale
    differs per layer, as llama.cpp's single alpha cannot say."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        use_rslora=True,
        alpha_pattern={"o_proj": 3},
        init_lora_weights=False,
    )
    peft = get_peft_model(base, config)
    peft.save_pretrained(out)
    return out


def _merged(base_dir, adapter_dir):
    from phitune.models import load_for_inference

    model, _ = load_for_inference(str(base_dir), str(adapter_dir))
    return model.merge_and_unload()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_f32_export_reads_back_in_transformers_and_round_trips(arch, model_cache, tmp_path, capsys):
    source = model_cache(arch)
    out = tmp_path / "gguf"
    assert _export(capsys, source, "--output", out, "--quant", "f32")[0] == 0
    ids = _ids(source)
    reference = _torch_logits(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), ids)
    read = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    np.testing.assert_allclose(_torch_logits(read, ids), reference, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")(TEXT)["input_ids"] == ids
    # phitune import gguf of the export gives the same model back.
    assert run_cli("import", "gguf", out / "model.gguf", "--output", tmp_path / "back") == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    np.testing.assert_allclose(_torch_logits(back, ids), reference, atol=1e-5)


def test_metadata_says_what_llama_cpp_needs(tiny_phi3, tmp_path, capsys):
    import gguf

    out = tmp_path / "gguf"
    assert _export(capsys, tiny_phi3, "--output", out, "--quant", "q8_0")[0] == 0
    reader = gguf.GGUFReader(str(out / "model.gguf"))

    def field(key):
        f = reader.fields[key]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.parts[i].tolist()[0] for i in f.data]
        return f.parts[f.data[0]].tolist()[0]

    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3)
    assert field("general.architecture") == "phi3" and field("general.type") == "model"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|end|>")] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("a")] == gguf.TokenType.NORMAL
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"  # vectors stay f32, as llama.cpp keeps them
    manifest = json.loads((out / "phitune_export.json").read_text())
    assert manifest["quant"] == "q8_0" and manifest["files"] == {"model": "model.gguf"}
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile
    assert 'TEMPLATE """' in modelfile


def test_lora_gguf_is_the_merged_weights_in_llama_cpp_layout(model_cache, tmp_path, capsys):
    """base tensor + lora_b @ lora_a (the file's alpha 0 = scale 1) equals the merged export's
    tensor for every layer: scales (rsLoRA, alpha_pattern) folded right, q/k rows reordered as
    the base's are."""
    import gguf

    source = model_cache("llama")
    adapter = _adapter(source, tmp_path / "adapter")
    assert _export(capsys, adapter, "--output", tmp_path / "lora", "--quant", "f32", "--lora")[0] == 0
    assert _export(capsys, adapter, "--output", tmp_path / "merged", "--quant", "f32")[0] == 0

    def tensors(path):
        return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}

    base, lora, merged = (
        tensors(tmp_path / "lora" / "base.gguf"),
        tensors(tmp_path / "lora" / "adapter.gguf"),
        tensors(tmp_path / "merged" / "model.gguf"),
    )
    reader = gguf.GGUFReader(str(tmp_path / "lora" / "adapter.gguf"))
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    assert reader.fields["adapter.lora.alpha"].parts[-1].tolist()[0] == 0.0
    targets = sorted({name.rsplit(".", 1)[0] for name in lora})
    assert len(targets) == 7 * 2  # q k v o gate up down, two layers
    for target in targets:
        delta = lora[target + ".lora_b"].astype(np.float64) @ lora[target + ".lora_a"].astype(np.float64)
        np.testing.assert_allclose(base[target] + delta, merged[target], atol=1e-5, err_msg=target)
    # The shared base was written once: a second fine-tune of the same base links the same file.
    second = _adapter(source, tmp_path / "adapter2", seed=1)
    assert _export(capsys, second, "--output", tmp_path / "lora2", "--quant", "f32", "--lora")[0] == 0
    assert (tmp_path / "lora2" / "base.gguf").stat().st_ino == (tmp_path / "lora" / "base.gguf").stat().st_ino
    # --base-gguf names a base file the user already has: linked, not written again.
    given = tmp_path / "mine.gguf"
    given.write_bytes((tmp_path / "lora" / "base.gguf").read_bytes())
    args = ("--output", tmp_path / "lora3", "--quant", "f32", "--lora", "--base-gguf", given)
    assert _export(capsys, second, *args)[0] == 0
    assert (tmp_path / "lora3" / "base.gguf").stat().st_ino == given.stat().st_ino
    modelfile = (tmp_path / "lora" / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf" in modelfile


def test_ollama_template_renders_as_the_jinja_template(real_model, tiny_phi3):
    """The Go template is rebuilt from per-role pieces; those pieces must render every
    conversation awaiting a reply exactly as the model's Jinja template does."""
    from phitune.export.ollama import derive_turns

    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}],
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ],
    ]
    for model in (real_model, tiny_phi3):
        tokenizer = AutoTokenizer.from_pretrained(model)

        def render(messages, generation, tokenizer=tokenizer):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

        turns = derive_turns(render, tokenizer.eos_token)
        assert turns is not None, model
        for messages in conversations:
            assert turns.render(messages) == render(messages, True)
    smol = derive_turns(
        lambda m, g: AutoTokenizer.from_pretrained(real_model).apply_chat_template(
            m, tokenize=False, add_generation_prompt=g
        )
    )
    assert smol.default_system.startswith("You are a helpful AI assistant named SmolLM")
    # Roles folded into each other (Mistral: system text inside the first [INST]) cannot be cut: no TEMPLATE.
    folded = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
        "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    from jinja2 import Template

    assert derive_turns(lambda m, g: Template(folded).render(messages=m, bos_token="<s>")) is None


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_phi3, tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    capsys.readouterr()  # save_pretrained's own progress bar
    cases = [
        ((gpt2, "--output", tmp_path / "o1"), "a 'gpt2' model; GGUF export covers llama, mistral, phi3, qwen2"),
        ((tiny_phi3, "--output", tmp_path / "o2", "--lora"), "a full fine-tune (no adapter) has no LoRA"),
        ((tiny_phi3, "--output", tmp_path / "o3", "--quant", "q3"), "--quant q3: use one of f32, f16"),
        ((tiny_phi3, "--output", busy), "exists and is not empty; pass --overwrite"),
        ((tiny_phi3, "--output", tmp_path / "o4", "--base-gguf", "x.gguf"), "--base-gguf x.gguf: only with --lora"),
        ((tmp_path / "nothing", "--output", tmp_path / "o5"), "not found"),
    ]
    # A k-quant without llama-cpp-python: the command that installs it (an import that fails here).
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    cases.append(((tiny_phi3, "--output", tmp_path / "o6", "--quant", "q4_k_m"), "needs llama-cpp-python"))
    cases.append(((tiny_phi3, "--output", tmp_path / "o7", "--check"), "make llama-cpp"))
    for args, says in cases:
        code, err = _export(capsys, *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        out = args[2]
        if out != busy:
            assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1


# --- llama.cpp itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_reads_each_architecture_as_pytorch_computes_it(arch, model_cache, tmp_path, capsys):
    needs_llama_cpp()
    from phitune.export.gguf_check import open_llama

    source = model_cache(arch)
    assert _export(capsys, source, "--output", tmp_path / "gguf", "--quant", "f32")[0] == 0
    ids = _ids(source)
    reference = _torch_logits(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), ids)
    llm = open_llama(tmp_path / "gguf", n_ctx=128, f32_cache=True)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_llama_cpp_base_plus_lora_equals_the_merged_model(model_cache, tmp_path, capsys):
    needs_llama_cpp()
    source = model_cache("phi3")
    adapter = _adapter(source, tmp_path / "adapter")
    assert _export(capsys, adapter, "--output", tmp_path / "lora", "--quant", "f32", "--lora")[0] == 0
    ids = _ids(source)
    merged = _torch_logits(_merged(source, adapter), ids)
    base = _torch_logits(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), ids)
    got = _llama_logits(tmp_path / "lora", ids)
    assert np.abs(merged - base).max() > 1e-2  # the adapter changes the model...
    np.testing.assert_allclose(got, merged, atol=1e-5)  # ...and llama.cpp applies it as PEFT does


def test_k_quant_by_llama_cpp_loads_and_stays_close(model_cache, tmp_path, capsys):
    needs_llama_cpp()
    source = model_cache("llama")
    assert _export(capsys, source, "--output", tmp_path / "q", "--quant", "q4_k_m")[0] == 0
    ids = _ids(source)
    reference = _torch_logits(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), ids)
    got = _llama_logits(tmp_path / "q", ids, f32_cache=False)
    assert _export(capsys, source, "--output", tmp_path / "f32", "--quant", "f32")[0] == 0
    assert (tmp_path / "q" / "model.gguf").stat().st_size < 0.5 * (tmp_path / "f32" / "model.gguf").stat().st_size
    assert np.abs(got - reference).max() < 0.25 * np.abs(reference).max()


def _sentencepiece_style_model(out):
    """A tiny Llama with a Llama-2/Phi-3-style tokenizer: byte-fallback BPE over '▁'-joined words,
    the 256 byte tokens in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from phitune.create_model import default_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tok.train_from_iterator(default_corpus().splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    # As in a real SentencePiece vocabulary, the byte tokens are ordinary entries, not added tokens.
    path = out / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] not in byte_tokens]
    path.write_text(json.dumps(data))
    return out


def test_llama_cpp_tokenizes_a_sentencepiece_style_vocabulary_as_transformers(tmp_path, capsys):
    needs_llama_cpp()
    from phitune.export.gguf_check import open_llama

    source = _sentencepiece_style_model(tmp_path / "spm")
    assert _export(capsys, source, "--output", tmp_path / "gguf", "--quant", "f32")[0] == 0
    tokenizer = AutoTokenizer.from_pretrained(source)
    llm = open_llama(tmp_path / "gguf", n_ctx=256, f32_cache=True)
    try:
        for text in (TEXT, "café ☕ über naïve", "  two spaces\tand a tab", "</s> as text"):
            ids = tokenizer(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
            # special tokens are CONTROL: parsed in text, never printed (as skip_special_tokens)
            assert llm.detokenize(ids[1:]).decode().strip() == tokenizer.decode(ids, skip_special_tokens=True).strip()
        ids = tokenizer(TEXT)["input_ids"]
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    reference = _torch_logits(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), ids)
    np.testing.assert_allclose(got, reference, atol=1e-5)


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,  # Phi-4-mini rotates part of each head
    "long_factor": [1.0, 2.0, 4.0, 8.0],
    "short_factor": [1.0, 1.1, 1.2, 1.5],
    "original_max_position_embeddings": 512,
}
ROPES = {
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 32}}),
    "linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "phi3-longrope": ("phi3", {"rope_parameters": LONGROPE, "partial_rotary_factor": 0.5,
                               "max_position_embeddings": 2048, "original_max_position_embeddings": 512}),
}  # fmt: skip


@pytest.mark.parametrize("rope", list(ROPES))
def test_llama_cpp_scales_rotary_embeddings_as_transformers(rope, model_cache, tmp_path, capsys):
    """Scaled rope (Llama 3.1, linear, Phi-3.5/Phi-4-mini longrope with partial rotary) in llama.cpp
    as in transformers, for a short text and one past the original context. llama.cpp picks
    longrope's factors by its context size, transformers by the sequence's length: compared
    where both pick the same (a context within the original length for the short text)."""
    needs_llama_cpp()
    from transformers import AutoConfig

    arch, changes = ROPES[rope]
    config = AutoConfig.from_pretrained(model_cache(arch))
    for key, value in changes.items():
        setattr(config, key, value)
    source = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(model_cache(arch), config=config).save_pretrained(source)
    AutoTokenizer.from_pretrained(model_cache(arch)).save_pretrained(source)
    assert _export(capsys, source, "--output", tmp_path / "gguf", "--quant", "f32")[0] == 0
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    for text, n_ctx in ((TEXT, 256), (" ".join(["the cup is hot and the tea is cold"] * 60), 1024)):
        ids = tokenizer(text)["input_ids"]
        assert len(ids) < 256 if n_ctx == 256 else len(ids) > 512
        got = _llama_logits(tmp_path / "gguf", ids, n_ctx=n_ctx)
        np.testing.assert_allclose(got, _torch_logits(model, ids), atol=1e-5, err_msg=f"{len(ids)} tokens")


@pytest.mark.parametrize("method", ["qlora", "dora", "ia3", "full"])
def test_every_method_exports_merged_as_it_answers(method, tiny_phi3, chat_files, tmp_path, capsys):
    """A run of each method, exported merged, gives in llama.cpp the logits phitune's own merge
    gives (QLoRA: folded into the dequantised 4-bit weights it was trained on)."""
    needs_llama_cpp()
    if method == "qlora":
        pytest.importorskip("bitsandbytes")

    spec = {"name": method} | ({"target_modules": ["all-linear"]} if method != "full" else {})
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], out, method=spec, max_steps=4)
    assert run_cli("train", cfg) == 0
    assert _export(capsys, out, "--output", tmp_path / "gguf", "--quant", "f32")[0] == 0
    if method == "full":
        reference_dir = out / "model"
    else:
        assert run_cli("merge", out, "--output", tmp_path / "merged") == 0
        reference_dir = tmp_path / "merged"
    ids = _ids(reference_dir)
    reference = _torch_logits(AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32), ids)
    base = _torch_logits(AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32), ids)
    assert np.abs(reference - base).max() > 1e-3  # the run changed the model
    got = _llama_logits(tmp_path / "gguf", ids)
    np.testing.assert_allclose(got, reference, atol=1e-5)


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("Modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


def test_the_modelfile_template_renders_in_go_as_the_jinja_template(real_model, model_cache, tmp_path):
    """The TEMPLATE line executed by Go's text/template (what Ollama runs) over `.Messages`, with
    the SYSTEM line put first as Ollama does when a conversation has no system message, gives
    the Jinja chat template's text."""
    import shutil
    import subprocess

    from phitune.export.ollama import derive_turns

    if not shutil.which("go"):
        (pytest.fail if os.environ.get("PHITUNE_REQUIRE_GO") else pytest.skip)("needs Go (apt-get install golang-go)")
    (tmp_path / "render.go").write_text(GO_RENDER)
    env = os.environ | {"GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", str(tmp_path / "render"), str(tmp_path / "render.go")], check=True, env=env)
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": 'a "quoted"\nline {{ x }}'}],
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three ☕"},
        ],
    ]
    for model in (real_model, model_cache("phi3"), model_cache("qwen2")):
        tokenizer = AutoTokenizer.from_pretrained(model)

        def render(messages, generation, tokenizer=tokenizer):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

        turns = derive_turns(render, tokenizer.eos_token)
        for messages in conversations:
            sent = messages
            if turns.default_system is not None and messages[0]["role"] != "system":
                sent = [{"role": "system", "content": turns.default_system}, *messages]  # Ollama's SYSTEM
            feed = json.dumps({"Template": turns.go_template(), "Messages": sent})
            out = subprocess.run([tmp_path / "render"], input=feed, capture_output=True, text=True, check=True)
            assert out.stdout == render(messages, True), (model, messages)


def test_sampling_settings_travel_and_a_wrong_base_gguf_is_refused(tiny_phi3, tmp_path, capsys):
    """A generation_config that samples becomes llama.cpp's general.sampling.* and the Modelfile's
    PARAMETERs; --base-gguf naming a file of another architecture is one line, exit 2."""
    import shutil

    import gguf
    from transformers import GenerationConfig

    source = tmp_path / "sampling"
    shutil.copytree(tiny_phi3, source)
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=40, eos_token_id=1).save_pretrained(source)
    assert _export(capsys, source, "--output", tmp_path / "gguf", "--quant", "f16")[0] == 0
    fields = gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).fields
    assert fields["general.sampling.temp"].parts[-1].tolist()[0] == pytest.approx(0.7)
    assert fields["general.sampling.top_p"].parts[-1].tolist()[0] == pytest.approx(0.9)
    assert fields["general.sampling.top_k"].parts[-1].tolist()[0] == 40
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "PARAMETER temperature 0.7" in modelfile and "PARAMETER top_k 40" in modelfile
    other = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(other), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    adapter = _adapter(tiny_phi3, tmp_path / "adapter")
    capsys.readouterr()  # the adapter's own loading bar
    code, err = _export(capsys, adapter, "--output", tmp_path / "o", "--lora", "--base-gguf", other)
    assert code == 2 and "a 'rwkv6' GGUF" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
