"""`phitune train` as a program runs under tcmalloc where it is installed, and says so in run.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phitune.training.allocator import in_use, reexec_with_tcmalloc, tcmalloc

from helpers import REPO


def _train(model, out, **env) -> dict:
    subprocess.run(
        [sys.executable, "-m", "phitune", "train", str(REPO / "examples" / "translation" / "config.yaml")]
        + ["--set", f"model.name_or_path={model}", "--set", f"output_dir={out}", "--max-steps", "1"],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
        cwd=REPO,
        timeout=300,
    )
    return json.loads((out / "run.json").read_text())


@pytest.mark.skipif(tcmalloc() is None, reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")
def test_train_runs_under_tcmalloc_unless_told_otherwise(tiny_phi3, tmp_path):
    env = {k: "" for k in ("LD_PRELOAD",) if k in os.environ}
    env["PHITUNE_ALLOCATOR"] = "auto"
    run = _train(tiny_phi3, tmp_path / "auto", **env)
    assert run["allocator"] == "tcmalloc"
    assert run["compiled"] is None  # training.compile auto: a one-step run never repays compiling
    env["PHITUNE_ALLOCATOR"] = "system"
    assert _train(tiny_phi3, tmp_path / "system", **env)["allocator"] == "glibc"


def test_told_to_keep_the_system_allocator_the_process_is_not_replaced(monkeypatch):
    """Replaced, this test process would exit with status 3 instead of passing."""
    monkeypatch.setenv("PHITUNE_ALLOCATOR", "system")
    reexec_with_tcmalloc([sys.executable, "-c", "raise SystemExit(3)"])
    assert in_use() == ("tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc")
