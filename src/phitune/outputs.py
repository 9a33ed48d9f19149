"""Directories that commands write (merged models, exports, manifests): never over a non-empty
one unless told to, and a finished one appears whole or not at all."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from phitune.errors import PhituneError


def refuse_non_empty(output, overwrite: bool) -> None:
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise PhituneError(f"{output}: exists and is not empty; pass --overwrite or choose another --output")


@contextmanager
def staged(output: Path) -> Iterator[Path]:
    """OUTPUT.tmp to write into (emptied first); it replaces OUTPUT when the block succeeds. A
    failed block leaves OUTPUT as it was."""
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
