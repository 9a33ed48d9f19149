"""The `phitune` command: parse arguments, call one function per verb, turn PhituneError into a
one-line message and exit code 2. Tracebacks only with --debug."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from phitune.argtypes import Parser
from phitune.cli import chat, data, deploy, evaluation, models, serve, train
from phitune.cli.common import EXIT_USAGE
from phitune.errors import PhituneError


def _quiet_libraries(debug: bool) -> None:
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        return
    logging.basicConfig(level=logging.INFO, format="phitune: %(message)s")
    for name in (
        "transformers",
        "accelerate",
        "peft",
        "bitsandbytes",
        "torch",
        "urllib3",
        "httpx",
        "huggingface_hub",
        "matplotlib",
        "lm-eval",
        "lm_eval",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars too
    if not any(Path(d).exists() for d in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on every import that it found no GPU
    os.environ.setdefault(
        "TRANSFORMERS_VERBOSITY", "error"
    )  # read when transformers is imported: not imported here (1 s)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="phitune", description="Fine-tune small language models (Phi-3 family first).")
    p.add_argument("--debug", action="store_true", help="show library logs and full tracebacks")
    # The deepspeed launcher puts --local_rank before the command; torchrun and accelerate use LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for group in (train, data, evaluation, chat, models, deploy, serve):
        group.register(sub)
    return p


def _die_with_parent() -> None:
    """A run started by a service worker (PHITUNE_PARENT_PID) is killed when that worker dies
    (Linux): a crashed worker never leaves a run writing where its successor resumes."""
    parent = os.environ.get("PHITUNE_PARENT_PID")
    if not parent:
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        os._exit(1)
    # The service's API answers first; training takes the CPU that is left. The run leads its own
    # session, and with autogroup scheduling (most Linux desktops and servers) nice only ranks
    # processes within a session: the session's group is niced too.
    os.nice(10)
    try:
        Path("/proc/self/autogroup").write_text("10")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # started as a program, not called from Python
    _die_with_parent()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    Parser.argv = argv
    args = parser.parse_args(argv)
    if program and getattr(args, "command", None) == "train":
        from phitune.training.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc([sys.executable, "-m", "phitune", *argv])
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _quiet_libraries(args.debug)
    rank = int(os.environ.get("RANK", 0))
    if rank != 0 and not args.debug:
        # Every process of a distributed run would say the same: only the first one speaks.
        logging.getLogger("phitune").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except PhituneError as exc:
        if args.debug:
            raise
        if rank == 0:  # the other processes stop with the same message
            print(f"phitune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `phitune config-reference | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        hint = "; resume with --resume if checkpoints were saved" if getattr(args, "command", None) == "train" else ""
        print(f"phitune: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if args.debug:
            raise
        print(f"phitune: error{f' (process {rank})' if rank else ''}: {_hint(exc)}", file=sys.stderr)
        return EXIT_USAGE if _is_oom(exc) else 1


def _is_oom(exc: Exception) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def _hint(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if _is_oom(exc):
        return (
            text + "; out of memory: lower training.batch_size (raise gradient_accumulation_steps to keep the batch), "
            "lower data.max_length, set training.gradient_checkpointing=true, or use method qlora"
        )
    return text + " (unexpected; rerun with --debug for the traceback and report it)"
