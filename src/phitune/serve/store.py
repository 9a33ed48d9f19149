"""The service's queries, by what they mean: routes, the worker and the portal ask here rather
than writing SQL of their own. Each takes an open session or connection (`db`): the caller owns
the transaction, so several of these commit together. Status transitions live in `status.py`,
paging in `listing.py`, the quota's sums in `storage.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from sqlalchemy import CursorResult, bindparam, func, select, update

from phitune.serve.db import Checkpoint, Event, File, Job, first
from phitune.serve.status import Status

if TYPE_CHECKING:
    from sqlalchemy.engine import Row
    from sqlalchemy.orm import Session

# --- jobs ------------------------------------------------------------------------------------------

JOB = select(Job).where(Job.id == bindparam("id"), Job.org == bindparam("org"))
RUNNING_OR_VALIDATING = (Status.RUNNING.value, Status.VALIDATING.value)


def job(db: Session, org: str, job_id: str) -> Job | None:
    """The organization's job `job_id` (None: no such job, or another organization's)."""
    return first(db, JOB, id=job_id, org=org)


def job_by_id(db: Session, job_id: str) -> Job | None:
    """A job whoever owns it: for the worker, never for a request."""
    return db.scalar(select(Job).where(Job.id == job_id))


def job_filter(org: str, metadata: dict[str, str]) -> list:
    """The organization's jobs, those whose metadata has each of these values."""
    return [Job.org == org, *(Job.meta[key].as_string() == value for key, value in metadata.items())]


def claim(db: Session, current: str, to: str, worker: str, heartbeat: float) -> Job | None:
    """One unowned job in status `current` moved to `to` for `worker`, oldest first; the conditional
    UPDATE makes it this worker's only (committed here)."""
    ids = list(db.scalars(select(Job.id).where(Job.status == current, Job.worker.is_(None)).order_by(Job.seq).limit(5)))
    for job_id in ids:
        claimed = cast(
            CursorResult,
            db.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == current, Job.worker.is_(None))
                .values(status=to, worker=worker, heartbeat=heartbeat)
            ),
        )
        db.commit()
        if claimed.rowcount == 1:
            return job_by_id(db, job_id)
    return None


def stale_jobs(db: Session, heartbeat_before: float) -> list[Job]:
    """Jobs a worker owns, running or validating, whose heartbeat stopped before this time."""
    return list(
        db.scalars(
            select(Job).where(
                Job.status.in_(RUNNING_OR_VALIDATING), Job.worker.is_not(None), Job.heartbeat < heartbeat_before
            )
        )
    )


def set_job(db: Session, job_id: str, **values: object) -> None:
    db.execute(update(Job).where(Job.id == job_id).values(**values))


def progress(db: Session, ids: list[str]) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """(last logged step, total steps) of each of these jobs."""
    steps = dict(
        db.execute(select(Event.job_id, func.max(Event.step)).where(Event.job_id.in_(ids)).group_by(Event.job_id)).all()
    )
    totals = dict(db.execute(select(Job.id, Job.total_steps).where(Job.id.in_(ids))).all())
    return steps, totals


# --- events ----------------------------------------------------------------------------------------


def last_event_step(db: Session, job_id: str) -> int:
    """The last step a metrics event was written for (0: none yet)."""
    return db.scalar(select(func.max(Event.step)).where(Event.job_id == job_id)) or 0


def last_metrics(db: Session, job_id: str) -> dict | None:
    return db.scalar(
        select(Event.data).where(Event.job_id == job_id, Event.type == "metrics").order_by(Event.seq.desc()).limit(1)
    )


def event_seq(db: Session, job_id: str, event_id: str) -> int | None:
    """Where event `event_id` of this job stands in its stream (None: no such event of this job)."""
    return db.scalar(select(Event.seq).where(Event.id == event_id, Event.job_id == job_id))


def events_after(db: Session, job_id: str, seq: int, limit: int) -> Sequence[Row]:
    return db.execute(
        select(Event).where(Event.job_id == job_id, Event.seq > seq).order_by(Event.seq).limit(limit)
    ).all()


# --- checkpoints and models --------------------------------------------------------------------------


def checkpoint_states(db: Session, job_id: str) -> dict[int, bool]:
    """step -> deleted, for every checkpoint object of the job."""
    return dict(db.execute(select(Checkpoint.step, Checkpoint.deleted).where(Checkpoint.job_id == job_id)).all())


def delete_checkpoints(db: Session, job_id: str, steps: list[int]) -> None:
    db.execute(update(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step.in_(steps)).values(deleted=True))


def fine_tuned(db: Session, org: str, model: str) -> Row | None:
    """(id, model) of the organization's job whose fine-tuned model is `model`, not deleted."""
    return db.execute(
        select(Job.id, Job.model).where(Job.org == org, Job.fine_tuned_model == model, Job.model_deleted.is_(False))
    ).first()


def checkpoint_model(db: Session, org: str, model: str) -> Row | None:
    """(job id, base model, step) of the organization's checkpoint named `model`, not deleted."""
    return db.execute(
        select(Job.id, Job.model, Checkpoint.step)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.org == org, Checkpoint.model_name == model, Checkpoint.deleted.is_(False))
    ).first()


FINE_TUNES = (
    select(Job.fine_tuned_model, func.coalesce(Job.finished_at, Job.created_at))
    .where(Job.org == bindparam("org"), Job.status == "succeeded", Job.model_deleted.is_(False))
    .order_by(Job.seq)
)
CHECKPOINTS = (
    select(Checkpoint.model_name, Checkpoint.created_at)
    .join(Job, Job.id == Checkpoint.job_id)
    .where(Job.org == bindparam("org"), Checkpoint.deleted.is_(False))
    .order_by(Checkpoint.seq)
)


def models(db: Session, org: str) -> list[tuple[str, int]]:
    """(model id, created) of the organization's fine-tuned models, then of its checkpoints."""
    return [*db.execute(FINE_TUNES, {"org": org}), *db.execute(CHECKPOINTS, {"org": org})]


def delete_model(db: Session, org: str, model: str) -> Job | None:
    """Mark the organization's fine-tuned `model` and its checkpoints deleted; the job (None: no
    such model). The caller commits and removes the weights."""
    found = db.scalar(select(Job).where(Job.org == org, Job.fine_tuned_model == model, Job.model_deleted.is_(False)))
    if found is None:
        return None
    found.model_deleted = True
    for ck in db.scalars(select(Checkpoint).where(Checkpoint.job_id == found.id)):
        ck.deleted = True
    return found


# --- files -----------------------------------------------------------------------------------------

FILE = select(File).where(File.id == bindparam("id"), File.org == bindparam("org"), File.deleted.is_(False))


def file(db: Session, org: str, file_id: str) -> File | None:
    """The organization's file `file_id`, not deleted."""
    return first(db, FILE, id=file_id, org=org)
