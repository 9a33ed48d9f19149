"""What commands write (merged models, exports, checkpoints, metrics): never over a non-empty
directory unless told to, and a finished directory or rewritten file appears whole or not at all."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from phitune.errors import PhituneError


def refuse_non_empty(output: str | Path, overwrite: bool) -> None:
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise PhituneError(f"{output}: exists and is not empty; pass --overwrite or choose another --output")


@contextmanager
def staged(output: Path, *, writer: bool = True) -> Iterator[Path]:
    """OUTPUT.tmp to write into (emptied first); it replaces OUTPUT when the block succeeds. A
    failed block leaves OUTPUT as it was, and no OUTPUT.tmp beside it. In a run of several
    processes every one enters the block (they may gather weights in it together) and only the
    `writer` empties, renames or removes."""
    tmp = output.with_name(output.name + ".tmp")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if writer:
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)


def replace_file(path: Path, text: str) -> None:
    """Rewrite PATH with TEXT: through PATH.tmp and a rename, so a crash leaves the old or the new
    file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


CHECKPOINT_PREFIX = "step-"


def checkpoint_dir(root: Path, step: int) -> Path:
    """ROOT/step-000120: where the checkpoint of `step` is (training, the service and chat all look here)."""
    return root / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints under ROOT, oldest first (one being written, `.tmp`, is not one)."""
    if not root.is_dir():
        return []
    done = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and not p.name.endswith(".tmp")
    ]
    return sorted(done, key=checkpoint_step)
