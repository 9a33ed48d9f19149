"""Deployment: ONNX Runtime GenAI export (fp32 parity with PyTorch, int4 close), the terminal chat
on both backends driven through stdin, and the errors that guard them."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, TOY_EXAMPLE_FLAGS, run_cli

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")

ASK = "Translate from English to French.\\n\\nThe milk is good."  # a typed \n is a line break


@pytest.fixture(scope="module")
def translator(tiny_phi3, tmp_path_factory):
    """The shipped translation example on the toy model: 200 steps at the toy rate (~10 s), LoRA on lm_head too."""
    out = tmp_path_factory.mktemp("deploy") / "translation"
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert (
            run_cli(
                "train",
                REPO / "examples" / "translation" / "config.yaml",
                "--set",
                f"model.name_or_path={tiny_phi3}",
                "--set",
                f"output_dir={out}",
                "--set",
                "training.precision=fp32",
                "--set",
                "training.eval_every=200",
                *TOY_EXAMPLE_FLAGS,
                "--set",
                "training.batch_size=16",
                "--set",
                "method.target_modules=[all-linear,lm_head]",
                "--max-steps",
                "200",
            )
            == 0
        )
    finally:
        os.chdir(cwd)
    return out


def _chat(*args, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phitune", "chat", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.slow  # the real-model tier covers this path in the default suite
def test_fp32_export_matches_pytorch_greedy_tokens_and_perplexity(translator, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "fp32"
    assert run_cli("export", "onnx", translator, "--output", out, "--precision", "fp32", "--check") == 0
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "chat_template.jinja", "task.json"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "check.json").read_text())
    assert report["prompts"] == 16 and report["greedy_exact"] == 1.0 and report["token_agreement"] == 1.0
    assert report["chat_prompt_ids_equal"] == 1.0  # onnxruntime-genai's template + tokenizer = transformers'
    assert abs(report["perplexity_change"]) < 1e-4 and report["held_out_examples"] == 24
    assert json.loads((out / "phitune_export.json").read_text())["adapter"].endswith("adapter")


def test_int4_export_stays_close_and_chats_with_the_fine_tuned_behaviour(translator, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "int4"
    assert run_cli("export", "onnx", translator, "--output", out, "--check") == 0
    report = json.loads((out / "check.json").read_text())
    assert report["token_agreement"] > 0.5 and abs(report["perplexity_change"]) < 0.1, report
    onnx = _chat(out, stdin=ASK + "\n")
    torch_run = _chat(translator, stdin=ASK + "\n")
    assert onnx.returncode == 0 and torch_run.returncode == 0, onnx.stderr + torch_run.stderr
    assert torch_run.stdout.strip() == "Le lait est bon."  # a training pair: the fine-tuned answer
    assert onnx.stdout.strip() == "Le lait est bon."


@pytest.mark.slow  # 13 s: the slow tier, to keep the default suite within budget
def test_int8_and_builder_options_reach_the_builder(translator, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "int8"
    assert (
        run_cli(
            "export",
            "onnx",
            translator,
            "--output",
            out,
            "--precision",
            "int8",
            "--builder-option",
            "block_size=16",
            "--check",
        )
        == 0
    )
    assert json.loads((out / "phitune_export.json").read_text())["builder_options"] == {"block_size": "16"}
    report = json.loads((out / "check.json").read_text())
    assert report["greedy_exact"] >= 0.9 and abs(report["perplexity_change"]) < 0.01, report
    assert run_cli("export", "onnx", translator, "--output", tmp_path / "x", "--builder-option", "block_size") == 2
    assert "give KEY=VALUE" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow  # 13 s of subprocess chat: the slow tier, to keep the default suite within budget
def test_chat_keeps_the_conversation_and_resets(translator):
    run = _chat(translator, "--backend", "torch", stdin=f"{ASK}\n/reset\n\n{ASK}\n/exit\nnever read\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["Le lait est bon.", "Le lait est bon."]


@pytest.mark.slow  # the real-model tier covers this path in the default suite
def test_generate_with_the_onnx_backend(translator, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "fp32"
    assert run_cli("export", "onnx", translator, "--output", out, "--precision", "fp32") == 0
    capsys.readouterr()
    assert run_cli("generate", out, "--prompt", "Translate from English to French.\n\nThe milk is good.") == 0
    assert capsys.readouterr().out.strip() == "Le lait est bon."


def test_export_and_chat_errors(translator, tmp_path, tiny_phi3, capsys):
    assert run_cli("chat", translator, "--backend", "onnx") == 2
    assert "phitune export onnx" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    assert run_cli("export", "onnx", translator, "--output", tmp_path / "busy") == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "busy" / "x").read_text() == "keep me"
    assert run_cli("export", "onnx", translator, "--output", tmp_path / "o", "--precision", "fp16") == 2
    assert "fp16 runs on cuda" in capsys.readouterr().err
    head = tmp_path / "head"
    (head / "adapter").mkdir(parents=True)
    (head / "task.json").write_text(json.dumps({"name": "classification", "head": True}))
    (head / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_phi3)}))
    assert run_cli("export", "onnx", head, "--output", tmp_path / "o") == 2
    assert "classification-head run" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def two_adapters(tiny_phi3, tmp_path_factory):
    """Two fine-tunes of one base on the toy model, LoRA on the linear layers (not lm_head), for multi-LoRA."""
    root = tmp_path_factory.mktemp("multilora")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for name in ("translation", "chatbot"):
            assert (
                run_cli(
                    "train",
                    REPO / "examples" / name / "config.yaml",
                    "--set",
                    f"model.name_or_path={tiny_phi3}",
                    "--set",
                    f"output_dir={root / name}",
                    "--set",
                    "training.precision=fp32",
                    "--set",
                    "method.target_modules=all-linear",
                    "--set",
                    "training.eval_every=1000",
                    *TOY_EXAMPLE_FLAGS,
                    "--set",
                    "training.batch_size=16",
                    "--max-steps",
                    "200" if name == "translation" else "80",
                )
                == 0
            )
    finally:
        os.chdir(cwd)
    return root / "translation", root / "chatbot"


@pytest.mark.slow  # 20-60 s on 2 cores: in the slow tier, to keep the default suite within budget
def test_multi_lora_adapters_change_outputs_exactly_as_in_pytorch(two_adapters, tiny_phi3, tmp_path):
    from phitune.backends import OnnxBackend
    from phitune.generate import greedy_ids, prompt_ids
    from phitune.models import load_for_inference

    fr, chat = two_adapters
    out = tmp_path / "multi"
    assert (
        run_cli(
            "export",
            "onnx",
            tiny_phi3,
            "--output",
            out,
            "--precision",
            "fp32",
            "--adapter",
            f"fr={fr}",
            "--adapter",
            f"chat={chat}",
        )
        == 0
    )
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["chat.onnx_adapter", "fr.onnx_adapter"]
    onnx = OnnxBackend(str(out))
    for name in ("fr", "chat"):
        onnx.load_adapter(str(out / "adapters" / f"{name}.onnx_adapter"), name)
    prompts = [
        [{"role": "user", "content": "Translate from English to French.\n\nThe milk is good."}],
        [
            {"role": "system", "content": "You take orders at PhiCafe."},
            {"role": "user", "content": "Can I have a latte?"},
        ],
        [{"role": "user", "content": "Hello there"}],
    ]
    seen = {}
    # Interleaved on one loaded model: the adapter switches per request.
    for name, source in (("fr", fr), ("chat", chat), (None, tiny_phi3), ("fr", fr)):
        model, tok = load_for_inference(str(source))
        for messages in prompts:
            ids = prompt_ids(tok, messages)
            ref = greedy_ids(model, tok, ids, max_new_tokens=16)
            got = list(onnx.generate_ids(ids, max_new_tokens=16, adapter=name))
            assert got == ref, (name, messages)
            seen[(name, messages[-1]["content"])] = got
    assert (
        seen[("fr", "Can I have a latte?")]
        != seen[("chat", "Can I have a latte?")]
        != seen[(None, "Can I have a latte?")]
    )
    run = _chat(out, "--adapter", "chat", "--system", "You take orders at PhiCafe.", stdin="Can I have a latte?\n")
    assert run.returncode == 0 and run.stdout.strip() == "One latte, coming up. Anything else?", run.stderr


def test_multi_lora_refusals(translator, tiny_phi3, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    fr = tmp_path / "fr"  # any adapter on the linear layers: the refusals come before its weights matter
    assert (
        run_cli(
            "train",
            REPO / "examples" / "translation" / "config.yaml",
            "--set",
            f"model.name_or_path={tiny_phi3}",
            "--set",
            f"output_dir={fr}",
            "--set",
            "method.target_modules=all-linear",
            "--max-steps",
            "2",
        )
        == 0
    )
    assert (
        run_cli("export", "onnx", tiny_phi3, "--output", tmp_path / "a", "--adapter", f"fr={fr}") == 2
    )  # int4 default
    assert "quantize the LoRA weights" in capsys.readouterr().err
    assert (
        run_cli(
            "export",
            "onnx",
            tiny_phi3,
            "--output",
            tmp_path / "b",
            "--precision",
            "fp32",
            "--adapter",
            f"fr={translator}",
        )
        == 2
    )
    assert "targets lm_head" in capsys.readouterr().err
    assert (
        run_cli("export", "onnx", tiny_phi3, "--output", tmp_path / "c", "--precision", "fp32", "--adapter", str(fr))
        == 2
    )
    assert "NAME=PATH" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")
