"""The README's command lines: every `phitune ...` line in its shell blocks parses with the real
argument parser (a renamed flag or verb fails here), and the cheap ones run as written, from a
fresh directory holding the shipped examples, with the exit code the README shows."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """`phitune ...` lines of the ```bash blocks, and `$ phitune ...` lines of the output blocks;
    continuation lines joined, trailing comments dropped."""
    out = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S):
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if lang == "bash" and line.startswith("phitune "):
                out.append(line)
            elif lang == "" and line.startswith("$ phitune "):
                out.append(line[2:])
    return [re.sub(r"\s+#.*$", "", c).strip() for c in out]


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 15 and any(c.startswith("phitune train") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    from phitune.cli import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])  # argparse exits (SystemExit) on a bad line
    assert getattr(args, "func", None), command


# Run as written: (README line, exit code the README promises). The rest need a GPU, the hub,
# a server or minutes (train them in the example tests instead).
CHEAP = {
    "phitune create-model models/tiny-phi3 --arch phi3 --preset tiny": 0,
    "phitune data validate examples/data/reviews.csv --task classification --model models/tiny-phi3 --max-length 80": 1,
    "phitune eval models/tiny-phi3 --task multiple_choice --data examples/data/questions.jsonl": 0,
}


def test_the_cheap_commands_run_as_written(tmp_path):
    assert set(CHEAP) <= set(COMMANDS), set(CHEAP) - set(COMMANDS)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command, code in CHEAP.items():
        proc = subprocess.run([sys.executable, "-m", "phitune", *shlex.split(command)[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, (command, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, command


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path):
    """The Quickstart block, line by line, from a fresh directory."""
    block = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.strip().splitlines()]
    assert [line.split()[1] for line in lines] == ["create-model", "train", "generate", "merge"]
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    for line in lines:
        proc = subprocess.run([sys.executable, "-m", "phitune", *shlex.split(line)[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert (tmp_path / "runs" / "lora-support-merged" / "config.json").is_file()
