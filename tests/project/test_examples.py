"""Every shipped example config runs (briefly) through the CLI on a locally built model."""

from pathlib import Path

import pytest

from helpers import REPO, TOY_EXAMPLE_FLAGS, losses, run_cli

# config -> the architecture its model directory stands for
CHEAP = {"lora-support.yaml": "phi3", "full-tiny.yaml": "phi3", "dora-llama.yaml": "llama"}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_example_runs(name, model_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # examples use paths relative to the repository root
    out = tmp_path / "out"
    overrides = ["--set", f"model.name_or_path={model_cache(CHEAP[name])}", "--set", f"output_dir={out}"]
    if name != "full-tiny.yaml":
        overrides += ["--max-steps", "6"]
    assert run_cli("train", REPO / "examples" / name, *overrides) == 0
    assert losses(out)
    assert (out / ("model" if name == "full-tiny.yaml" else "adapter")).is_dir()


def test_the_hub_example_parses_and_targets_phi3():
    import yaml

    from phitune.config import parse_config

    raw = yaml.safe_load((REPO / "examples" / "qlora-phi3-mini.yaml").read_text())
    raw["data"] = {k: str(REPO / v) if k in ("train", "validation") else v for k, v in raw["data"].items()}
    cfg = parse_config(raw)
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct" and cfg.method.name == "qlora"


SCENARIOS = sorted(str(p.relative_to(REPO / "examples")) for p in (REPO / "examples").glob("*/*.yaml"))


def test_every_scenario_has_an_example():
    dirs = {s.split("/")[0] for s in SCENARIOS}
    assert dirs >= {"classification", "ner", "translation", "qa", "chatbot", "creative", "domain", "dpo"}


def _generated_data(name: str, tmp_path, request) -> list[str]:
    """--set flags pointing a config whose data is generated on the machine (FreeDict dictionaries,
    WordNet: Debian packages, not shipped) at a fresh copy; skips where the package is missing."""
    import subprocess
    import sys

    import yaml

    data = yaml.safe_load((REPO / "examples" / name).read_text())["data"]
    if not data["train"].startswith("data/"):
        return []
    folder = Path(data["train"]).parent.name
    if folder.startswith("wordnet"):
        if not Path("/usr/share/wordnet/data.noun").is_file():
            pytest.skip("needs Debian's wordnet-base (apt-get install wordnet-base)")
        command = ["make_wordnet_data.py", "--train", "120", "--val", "30"]
    else:
        pair = folder.removeprefix("dictionary-")
        if not Path(f"/usr/share/dictd/freedict-{pair}.index").is_file():
            pytest.skip(f"needs Debian's dict-freedict-{pair} (apt-get install dict-freedict-{pair})")
        command = [
            "make_dictionary_data.py",
            "--pair",
            pair,
            "--tokenizer",
            str(request.getfixturevalue("real_model")),
            "--train",
            "320",
            "--val",
            "32",
        ]
    subprocess.run(
        [sys.executable, str(REPO / "examples" / command[0]), *command[1:], "--output", str(tmp_path / "data")],
        check=True,
    )
    return [
        "--set",
        f"data.train={tmp_path / 'data' / 'train.jsonl'}",
        "--set",
        f"data.validation={tmp_path / 'data' / 'val.jsonl'}",
    ]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_example_trains(name, tiny_phi3, tmp_path, monkeypatch, request):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    generated = _generated_data(name, tmp_path, request)
    assert (
        run_cli(
            "train",
            REPO / "examples" / name,
            "--set",
            f"model.name_or_path={tiny_phi3}",
            *generated,
            "--set",
            f"output_dir={out}",
            "--set",
            "training.log_every=1",
            *TOY_EXAMPLE_FLAGS,
            "--max-steps",
            "20",
        )
        == 0
    )
    trace = losses(out)
    assert len(trace) == 20 and sum(trace[-3:]) / 3 < trace[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "task.json").is_file()
