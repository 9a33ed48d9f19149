"""The command line's own checks: value types that refuse nonsense at parse time (`--max-new-tokens
0`, `--temperature -1`, `--limit 0`), and a parser whose errors are one line that names the fix,
with the closest flag (or the `--set` key) for a flag it does not know."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn

# Flags users bring from other trainers -> the config key that means it.
CONFIG_ALIASES = {
    "lr": "training.learning_rate",
    "learning-rate": "training.learning_rate",
    "epochs": "training.epochs",
    "num-train-epochs": "training.epochs",
    "batch-size": "training.batch_size",
    "per-device-train-batch-size": "training.batch_size",
    "seed": "training.seed",
    "lora-r": "method.r",
    "lora-rank": "method.r",
    "r": "method.r",
    "lora-alpha": "method.alpha",
    "lora-dropout": "method.dropout",
    "max-length": "data.max_length",
    "max-seq-length": "data.max_length",
    "gradient-accumulation-steps": "training.gradient_accumulation_steps",
    "warmup-steps": "training.warmup_steps",
    "weight-decay": "training.weight_decay",
    "save-steps": "training.save_every",
    "eval-steps": "training.eval_every",
    "bf16": "training.precision",
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value}: must be a number >= 0 (0 = greedy)")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`phitune train: error: ...; did you mean --max-steps?`)."""

    argv: list[str] = []

    def error(self, message: str) -> NoReturn:  # noqa: D102 - argparse's hook
        if message.startswith("unrecognized arguments:"):
            message += self._suggestion(message.split(":", 1)[1].split())
        prog = self._command().prog
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        sys.exit(2)

    def _suggestion(self, unknown: list[str]) -> str:
        flag = next((u for u in unknown if u.startswith("-")), None)
        if flag is None:
            return ""
        command = self._command()
        name = flag.lstrip("-").split("=", 1)[0]
        known = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
        known = [o for o in known if o != "--help"]
        close = difflib.get_close_matches(flag.split("=", 1)[0], known, n=1, cutoff=0.75)
        key = CONFIG_ALIASES.get(name) or _config_key(name)
        hints = ([f"did you mean {close[0]}?"] if close else []) + (
            [f"set the config key with --set {key}=VALUE"] if key and "--set" in known else []
        )
        return "; " + " or ".join(hints) if hints else ""

    def _command(self) -> argparse.ArgumentParser:
        """The subcommand parser the command line named (its flags are the ones to suggest)."""
        parser = self
        for word in self.argv:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            if subs and word in subs[0].choices:
                parser = subs[0].choices[word]
        return parser


def _config_key(name: str) -> str | None:
    """`--warmup-ratio` -> training.warmup_ratio: a flag spelled like a config key."""
    from phitune.config import _SECTIONS

    wanted = name.replace("-", "_")
    for section, model in _SECTIONS.items():
        if wanted in model.model_fields:
            return f"{section}.{wanted}"
    return None
