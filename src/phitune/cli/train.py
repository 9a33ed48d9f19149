"""`phitune train` (one process, or N started here), `phitune demo`, `phitune config-reference`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from phitune.argtypes import positive_int
from phitune.cli.common import log
from phitune.errors import PhituneError


def _overrides(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """`--set` items, and the shortcut flags as the same items (each mapped to how it was typed)."""
    overrides, flags = list(args.set or []), {}
    for flag, key in (
        ("model", "model.name_or_path"),
        ("method", "method.name"),
        ("train_file", "data.train"),
        ("validation_file", "data.validation"),
        ("output_dir", "output_dir"),
        ("max_steps", "training.max_steps"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
            flags[overrides[-1]] = f"--{flag.replace('_', '-')} {value}"
    return overrides, flags


def cmd_train(args: argparse.Namespace) -> int:
    from phitune.config import load_config
    from phitune.sources import check_source

    overrides, flags = _overrides(args)
    cfg = load_config(args.config, overrides, flags=flags)  # checked here, before any process is started
    check_source(cfg.model.name_or_path)  # in a second, not after the hub's retries
    from phitune.training.sft import train

    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from phitune.training.distributed import check_batch, resolve_strategy

        resolve_strategy(cfg, args.nproc)
        check_batch(cfg, args.nproc)
        return launch_local(args.nproc, args.argv)
    from phitune.training.distributed import finish

    try:
        if args.auto_resume:  # a restarted pod: continue when there is a checkpoint, else start over
            from phitune.outputs import list_checkpoints
            from phitune.training.setup import replaceable

            has = bool(list_checkpoints(Path(cfg.output_dir) / "checkpoints"))
            if not has and not replaceable(Path(cfg.output_dir)):
                raise PhituneError(
                    f"{cfg.output_dir}: --auto-resume found no checkpoint there, and the directory holds "
                    "files that are not a phitune run of this output_dir, so it is left alone; choose "
                    "another output_dir or empty this one"
                )
            result = train(cfg, resume=has, overwrite=not has)
        else:
            result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except BaseException:
        finish(ok=False)
        raise
    finish()
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    ev = result.eval_metrics
    shown = ", ".join(f"{k} {v:.4f}" for k, v in (ev or {}).items())
    trained = (
        f"final train loss {result.final_train_loss:.4f}"
        if result.final_train_loss is not None
        else "no step left to train"
    )
    print(f"done: {result.state.step} steps, {trained}" + (f"; eval: {shown}" if ev else ""))
    print(f"wrote {result.artifact} (and metrics.jsonl, config.yaml, README.md in {result.output_dir})")
    return 0


def launch_local(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: start N processes of this same command with torchrun's launcher on this machine."""
    import subprocess

    from phitune.training.distributed import free_port

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "phitune",
        *rest,
    ]
    env = dict(os.environ)
    # Several processes on one CPU: split its cores instead of each taking them all.
    if not __import__("torch").cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd, env=env)


def cmd_demo(args: argparse.Namespace) -> int:
    from phitune.demo import run_demo

    run_demo(
        output=args.output,
        model=args.model,
        toy=args.toy,
        arch=args.arch,
        preset=args.preset,
        data_dir=args.data_dir,
        max_steps=args.max_steps,
    )
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from phitune.config import reference_markdown

    print(reference_markdown())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune from a YAML config (and/or flags)")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. training.learning_rate=1e-4 (repeatable)",
    )
    t.add_argument("--model", help="= --set model.name_or_path=...")
    t.add_argument("--method", help="= --set method.name=...")
    t.add_argument("--train-file", help="= --set data.train=...")
    t.add_argument("--validation-file", help="= --set data.validation=...")
    t.add_argument("--output-dir", help="= --set output_dir=...")
    t.add_argument("--max-steps", type=positive_int, help="= --set training.max_steps=...")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from the latest checkpoint if there is one, else start over (for restarted pods)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    t.add_argument(
        "--nproc",
        type=positive_int,
        help="start N processes on this machine (data parallel / DeepSpeed, see distributed.*)",
    )
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="fine-tune SmolLM2-135M-Instruct with LoRA on the café data, show before/after")
    d.add_argument("--output", default="runs/demo")
    which = d.add_mutually_exclusive_group()
    which.add_argument("--model", help="base model (local dir or hub id) instead of SmolLM2-135M-Instruct")
    which.add_argument(
        "--toy", action="store_true", help="an untrained tiny model instead (seconds; proves the code path only)"
    )
    d.add_argument("--arch", default="phi3", help="--toy: architecture (default phi3)")
    d.add_argument("--preset", default="tiny", help="--toy: size preset (default tiny)")
    d.add_argument("--data-dir", default="examples/data")
    d.add_argument("--max-steps", type=positive_int, default=None)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("config-reference", help="print every config key as a markdown table")
    r.set_defaults(func=cmd_config_reference)
