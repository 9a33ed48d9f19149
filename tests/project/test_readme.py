"""The README's command lines: every `phitune ...` line in its shell blocks parses with the real
argument parser (a renamed flag or verb fails here), and the cheap ones run as written, from a
fresh directory holding the shipped examples, with the exit code the README shows."""

import re
import shlex
import shutil

import pytest

from helpers import REPO, run_cli

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


def test_the_cheap_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """In this process (the CLI's own entry point), from a directory holding a copy of examples/.
    The Quickstart's train / generate / merge are run by tests/project/test_examples.py and test_artifacts.py."""
    assert set(CHEAP) <= set(COMMANDS), set(CHEAP) - set(COMMANDS)
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for command, code in CHEAP.items():
        assert run_cli(*shlex.split(command)[1:]) == code, (command, capsys.readouterr().err[-2000:])
        assert "Traceback" not in capsys.readouterr().err, command
