"""What the service keeps on disk, per organization: the quota on files and runs, the weights a
deleted model leaves behind, and the uploads a killed server left half-written.

An upload is written to `<id>.partial` and renamed to its final name once its row is committed:
a file with a final name always has a row. `recover` (at `phitune serve` start) finishes the
rename of a partial whose row was committed and removes the others."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from phitune.serve.db import File, Job
from phitune.serve.errors import ApiError

if TYPE_CHECKING:
    from phitune.serve.settings import Settings

log = logging.getLogger("phitune.serve")
PARTIAL = ".partial"


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while walking (a checkpoint rotated out)
                pass
    return total


def usage(settings: Settings, connect, org: str) -> int:
    """Bytes the organization stores: its files (as uploaded) and its jobs' run directories. The
    rows are read in a connection of its own (`connect`: reads or sessions), closed before the disk
    is walked: never a walk under SQLite's write lock."""
    with connect() as db:
        files = db.execute(
            select(func.coalesce(func.sum(File.bytes), 0)).where(File.org == org, File.deleted.is_(False))
        )
        stored = int(files.scalar_one())
        jobs = db.execute(select(Job.id).where(Job.org == org)).scalars().all()
    return stored + sum(directory_bytes(settings.run_dir(job_id)) for job_id in jobs)


def room(settings: Settings, connect, org: str, what: str) -> int | None:
    """Bytes the organization may still add (None: no quota); a 403 naming the limit when none."""
    if not settings.org_quota_bytes:
        return None
    used = usage(settings, connect, org)
    if used >= settings.org_quota_bytes:
        raise quota_error(settings, used, what)
    return settings.org_quota_bytes - used


def quota_error(settings: Settings, used: int, what: str) -> ApiError:
    limit = settings.org_quota_bytes or 0  # asked only where a quota is set
    return ApiError(
        403,
        f"{what}: your organization stores {used / 2**20:.1f} MiB of files and fine-tuning runs, and this server's "
        f"quota is {limit / 2**20:.1f} MiB (--org-quota-mb); delete files or fine-tuned models to make room",
        code="storage_quota_exceeded",
    )


def remove_weights(settings: Settings, job_id: str) -> None:
    """A deleted fine-tuned model's weights: the adapter or merged model, its checkpoints, its best
    and its GGUF exports."""
    run = settings.run_dir(job_id)
    for name in ("adapter", "model", "checkpoints", "best", "gguf"):
        shutil.rmtree(run / name, ignore_errors=True)


def recover(settings: Settings, sessions) -> None:
    """Uploads cut off by a killed server: a partial whose row exists is finished; one without a
    row is removed once no upload can still be writing it (a body that pauses longer than the read
    timeout is refused), and so is a stored file with no row."""
    if not settings.files_dir.is_dir():
        return
    with sessions() as db:
        known = set(db.execute(select(File.id)).scalars())
    quiet_since = time.time() - 2 * settings.read_timeout
    for path in settings.files_dir.iterdir():
        file_id = path.name.split(".", 1)[0]
        if file_id in known:
            if path.name.endswith(PARTIAL):
                path.replace(path.with_name(path.name[: -len(PARTIAL)]))
        elif path.stat().st_mtime < quiet_since:
            path.unlink(missing_ok=True)
            log.warning("removed %s: an upload that never finished, or a file with no record", path.name)
