"""The manual (README.md and docs/): every `phitune ...` line in its shell blocks parses with the
real argument parser (a renamed flag or verb fails here), the cheap ones run as written from a
fresh directory holding the shipped examples, with the exit code the page shows; the generated
reference pages equal what the code generates; and the site builds with `mkdocs build --strict`
(no broken link or anchor)."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, run_cli

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MANUAL = "\n".join(p.read_text() for p in PAGES)


def manual_commands() -> list[str]:
    """`phitune ...` lines of the ```bash blocks, and `$ phitune ...` lines of the output blocks;
    continuation lines joined, trailing comments dropped."""
    out = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", MANUAL, flags=re.S):
        text = body.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if lang == "bash" and line.startswith("phitune "):
                out.append(line)
            elif lang == "" and line.startswith("$ phitune "):
                out.append(line[2:])
    return [re.sub(r"\s+#.*$", "", c).strip() for c in out]


COMMANDS = manual_commands()


def test_the_manual_has_commands():
    assert len(COMMANDS) >= 15 and any(c.startswith("phitune train") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_documented_command_parses(command):
    from phitune.cli import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])  # argparse exits (SystemExit) on a bad line
    assert getattr(args, "func", None), command


# Run as written: (the manual's line, exit code the page promises). The rest need a GPU, the hub,
# a server or minutes (train them in the example tests instead).
CHEAP = {
    "phitune create-model models/tiny-phi3 --arch phi3 --preset tiny": 0,
    "phitune data validate examples/data/reviews.csv --task classification --model models/tiny-phi3 --max-length 80": 1,
    "phitune eval models/tiny-phi3 --task multiple_choice --data examples/data/questions.jsonl": 0,
}


def test_the_cheap_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """In this process (the CLI's own entry point), from a directory holding a copy of examples/.
    The Quickstart's train / generate / merge are run by tests/project/test_examples.py and test_artifacts.py."""
    assert set(CHEAP) <= set(COMMANDS), set(CHEAP) - set(COMMANDS)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for command, code in CHEAP.items():
        assert run_cli(*shlex.split(command)[1:]) == code, (command, capsys.readouterr().err[-2000:])
        assert "Traceback" not in capsys.readouterr().err, command


def test_the_generated_reference_pages_are_current():
    """The configuration, CLI, REST API and job-options pages, and the benchmark pages, equal what
    scripts/docs_reference.py makes from the code now."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "docs_reference.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_the_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing anchor or a page left out of the nav fails."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config.html").is_file()
