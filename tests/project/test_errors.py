"""Bad input gets one clear message naming the key/file/line and the fix, exit code 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from helpers import run_cli, write_config


def _run(capsys, *args):
    code = run_cli(*args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_missing_model_path(tmp_path, chat_files, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "nope", chat_files[0], tmp_path / "out")
    code, err = _run(capsys, "train", cfg)
    assert code == 2 and "model directory not found" in err and "phitune create-model" in err


def test_unreachable_hub_id(tmp_path, chat_files):
    # In a subprocess: huggingface_hub reads HF_HUB_OFFLINE at import time (online, it retries for ~45 s).
    cfg = write_config(tmp_path / "c.yaml", "nobody-here/no-such-model", chat_files[0], tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "phitune", "train", str(cfg)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.name_or_path: 'nobody-here/no-such-model' is not a directory here, and the hub" in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unknown_method_and_bad_hyperparameter(tmp_path, tiny_phi3, chat_files, capsys):
    cfg = write_config(
        tmp_path / "c.yaml", tiny_phi3, chat_files[0], tmp_path / "out", method="lorax", learning_rate=-1
    )
    code, err = _run(capsys, "train", cfg)
    assert code == 2
    assert "method.name" in err and "'lorax'" in err
    assert "training.learning_rate" in err and "greater than 0" in err


def test_malformed_dataset_names_file_and_line(tmp_path, tiny_phi3, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        + "\n{oops\n"
    )
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, data, tmp_path / "out")
    code, err = _run(capsys, "train", cfg)
    assert code == 2 and f"{data}:2: invalid JSON" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # failed before training started


def test_missing_dataset(tmp_path, tiny_phi3, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, tmp_path / "missing.jsonl", tmp_path / "out")
    code, err = _run(capsys, "train", cfg)
    assert code == 2 and "data.train: file not found" in err


def test_wrong_target_module_lists_real_ones(tmp_path, tiny_phi3, chat_files, capsys):
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_phi3,
        chat_files[0],
        tmp_path / "out",
        method={"name": "lora", "target_modules": ["q_proj", "v_proj"]},
    )
    code, err = _run(capsys, "train", cfg)
    assert code == 2
    assert "q_proj, v_proj are not a linear layer of this model" in err
    assert "linear layers are: down_proj, gate_up_proj, o_proj, qkv_proj" in err


def test_existing_output_dir_is_not_clobbered(tmp_path, tiny_phi3, chat_files, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], out)
    code, err = _run(capsys, "train", cfg)
    assert code == 2 and "pass --resume to continue it, --overwrite to replace it" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, err = _run(capsys, "train", cfg, "--resume")
    assert code == 2 and "there is no checkpoint" in err


def test_fp16_on_cpu_explains(tmp_path, tiny_phi3, chat_files, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on CUDA")
    cfg = write_config(tmp_path / "c.yaml", tiny_phi3, chat_files[0], tmp_path / "out", precision="fp16")
    code, err = _run(capsys, "train", cfg)
    assert code == 2 and "fp16 needs a CUDA GPU; use bf16" in err


def test_create_model_bad_arch(tmp_path, capsys):
    code, err = _run(capsys, "create-model", tmp_path / "m", "--arch", "gpt9")
    assert code == 2 and "--arch 'gpt9': unknown architecture; choose one of phi3, llama, qwen2, mistral" in err


def test_debug_shows_traceback(tmp_path, chat_files):
    from phitune.cli import main
    from phitune.errors import PhituneError

    cfg = write_config(tmp_path / "c.yaml", tmp_path / "nope", chat_files[0], tmp_path / "out")
    with pytest.raises(PhituneError):
        main(["--debug", "train", str(cfg)])


def test_out_of_memory_gets_the_remedies():
    from phitune.cli import _hint, _is_oom

    exc = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert _is_oom(exc) and _is_oom(MemoryError())
    hint = _hint(exc)
    assert "lower training.batch_size" in hint and "gradient_checkpointing=true" in hint and "qlora" in hint


def test_keys_commands_on_a_missing_storage_or_a_bad_org_are_one_line_and_create_nothing(tmp_path, capsys):
    pytest.importorskip("sqlalchemy")
    missing = tmp_path / "no-such-storage"
    for args in (["keys", "list"], ["keys", "revoke", "0123456789ab"]):
        assert run_cli(*args, "--storage", missing) == 2
        err = capsys.readouterr().err
        assert f"--storage {missing}: no such directory" in err and len(err.strip().splitlines()) == 1, err
    assert run_cli("keys", "create", "--org", "bad org", "--storage", missing) == 2
    assert "--org 'bad org'" in capsys.readouterr().err and not missing.exists()
    assert run_cli("keys", "create", "--org", "acme", "--storage", missing) == 0
    key = capsys.readouterr().out.strip()
    assert run_cli("keys", "list", "--storage", missing) == 0 and "  acme  " in capsys.readouterr().out
    assert run_cli("keys", "revoke", key, "--storage", missing) == 0 and "revoked key" in capsys.readouterr().out
