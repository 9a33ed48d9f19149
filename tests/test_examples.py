"""Every shipped example config runs (briefly) through the CLI on a locally built model."""

import pytest

from conftest import REPO, losses, run_cli

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
    from phitune.config import parse_config
    import yaml

    raw = yaml.safe_load((REPO / "examples" / "qlora-phi3-mini.yaml").read_text())
    raw["data"] = {k: str(REPO / v) if k in ("train", "validation") else v for k, v in raw["data"].items()}
    cfg = parse_config(raw)
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct" and cfg.method.name == "qlora"


SCENARIOS = sorted(str(p.relative_to(REPO / "examples")) for p in (REPO / "examples").glob("*/*.yaml"))


def test_every_scenario_has_an_example():
    dirs = {s.split("/")[0] for s in SCENARIOS}
    assert dirs >= {"classification", "ner", "translation", "qa", "chatbot", "creative", "domain", "dpo"}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_example_trains(name, tiny_phi3, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    assert run_cli("train", REPO / "examples" / name, "--set", f"model.name_or_path={tiny_phi3}",
                   "--set", f"output_dir={out}", "--set", "training.log_every=1", "--max-steps", "20") == 0
    trace = losses(out)
    assert len(trace) == 20 and sum(trace[-3:]) / 3 < trace[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "task.json").is_file()
