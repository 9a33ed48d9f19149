"""A job's status: the values, the moves between them, and the one way to make a move (a
conditional UPDATE), so that a final status is never overwritten: a job cancelled while its files
are validated stays cancelled when the validation fails, and a cancel accepted while a job runs is
not turned into a pause by a later pause request.

Who moves a job: the API (cancel, pause, resume), the worker (claim, validation, the run's end, a
re-queue after a lost worker). Both may act on one job at once, in separate processes and, on
PostgreSQL, separate machines: each move names the statuses it may come from, and the database
applies it only if the job is still in one of them."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, cast

from sqlalchemy import CursorResult, update

from phitune.serve.db import Job, add_event

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Status(str, Enum):
    VALIDATING = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
ALL = tuple(s.value for s in Status)

# to -> the statuses a job may come from. A final status leads nowhere.
SOURCES: dict[Status, frozenset[Status]] = {
    Status.VALIDATING: frozenset({Status.VALIDATING}),  # a lost validator's job, handed to the next
    Status.QUEUED: frozenset({Status.VALIDATING, Status.RUNNING, Status.PAUSED}),  # validated, re-queued, resumed
    Status.RUNNING: frozenset({Status.QUEUED}),
    Status.PAUSED: frozenset({Status.QUEUED, Status.RUNNING}),
    Status.SUCCEEDED: frozenset({Status.RUNNING}),
    Status.FAILED: frozenset({Status.VALIDATING, Status.RUNNING}),
    Status.CANCELLED: frozenset({Status.VALIDATING, Status.QUEUED, Status.RUNNING, Status.PAUSED}),
}

# Requests the API leaves for the worker that runs a job; a cancel is never replaced by a pause.
CANCEL, PAUSE = "cancel", "pause"


def move(
    db: Session,
    job_id: str,
    to: Status,
    *,
    event: str | None = None,
    level: str = "info",
    only_from: frozenset[Status] | None = None,
    where: tuple = (),
    **values: object,
) -> bool:
    """Move the job to `to` (with `values`) if it is still in a status that may lead there (and in
    `only_from`, when given, and meets `where`); its event is added only when the move happened.
    In the caller's transaction: the caller commits."""
    sources = SOURCES[to] & only_from if only_from is not None else SOURCES[to]
    moved = cast(
        CursorResult,
        db.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_([s.value for s in sources]), *where)
            .values(status=to.value, **values)
        ),
    )
    if moved.rowcount == 1 and event:
        add_event(db, job_id, event, level=level)
    return moved.rowcount == 1


def request(db: Session, job_id: str, what: str) -> bool:
    """Leave a cancel or pause request for the worker of a running job. A pause never replaces
    an accepted cancel (a cancel does replace a pause: the stronger request wins)."""
    free = Job.requested.is_(None) if what == PAUSE else Job.requested.is_(None) | (Job.requested == PAUSE)
    moved = cast(
        CursorResult,
        db.execute(
            update(Job).where(Job.id == job_id, Job.status == Status.RUNNING.value, free).values(requested=what)
        ),
    )
    return moved.rowcount == 1
