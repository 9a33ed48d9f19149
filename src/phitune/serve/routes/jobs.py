"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints.

A job is checked as far as it can be at creation (model served, files yours and for fine-tuning,
hyperparameter ranges, phitune options against the config schema): a request that can never
succeed is a 400 now, not a failure minutes later. The data itself is validated by the worker
(`validating_files`), which names the file and line of every problem."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from phitune.errors import PhituneError
from phitune.serve import schemas, status, storage, store
from phitune.serve.db import Checkpoint, Event, Job, add_event, new_id, now
from phitune.serve.deps import Org, Reads, ServerSettings, Sessions, require_served
from phitune.serve.errors import ApiError, not_found
from phitune.serve.listing import limit_query, page
from phitune.serve.routes.files import get_file
from phitune.serve.schemas import JobCreate, Method
from phitune.serve.status import Status

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

router = APIRouter(tags=["fine_tuning"])


def render(job: Job) -> dict:
    hyper = {k: job.hyperparameters.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
    method: dict[str, Any] = {"type": job.method.get("type", "supervised")}
    method[method["type"]] = {
        "hyperparameters": {
            **hyper,
            **({"beta": job.hyperparameters.get("beta", "auto")} if method["type"] == "dpo" else {}),
        }
    }
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": None if job.model_deleted else job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": hyper,
        "model": job.model,
        "organization_id": job.org,
        "result_files": job.result_files,
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": job.estimated_finish,
        "integrations": [],
        "metadata": job.meta,
        "method": method,
        "user_provided_suffix": job.suffix,
    }


def get_job(db: Session, org: str, job_id: str) -> Job:
    job = store.job(db, org, job_id)
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


def _hyperparameters(body: JobCreate) -> tuple[str, dict]:
    """The method and the hyperparameters asked for (top-level `hyperparameters` is OpenAI's older
    spelling; the method's own win). Types and ranges were checked by the schema."""
    method = body.method or Method(type="supervised")
    kind = method.type
    asked = body.hyperparameters.model_dump(exclude_unset=True) if body.hyperparameters else {}
    if kind == "supervised" and "beta" in asked:
        raise ApiError(400, "hyperparameters.beta: only for method.type dpo", param="hyperparameters.beta")
    own = getattr(method, kind)
    if own is not None and own.hyperparameters is not None:
        asked |= own.hyperparameters.model_dump(exclude_unset=True)
    if kind == "dpo":
        asked.setdefault("beta", "auto")
    return kind, asked


@router.post("/fine_tuning/jobs", **schemas.documented(schemas.Job, 400, 401, 404))
def create_job(body: JobCreate, org: Org, settings: ServerSettings, sessions: Sessions, reads: Reads) -> dict:
    from phitune.serve.jobconfig import build_config, choose_hyperparameters

    require_served(settings, body.model)
    kind, asked = _hyperparameters(body)
    options = body.phitune.model_dump(exclude_unset=True) if body.phitune else {}
    with reads() as db:
        for param in ("training_file", "validation_file"):
            file_id = getattr(body, param)
            if file_id is None:
                continue
            f = get_file(db, org, file_id, param)
            if f.purpose != "fine-tune":
                raise ApiError(
                    400,
                    f"{param} '{file_id}': purpose is '{f.purpose}', not 'fine-tune'",
                    param=param,
                    code="invalid_file_purpose",
                )
    storage.room(settings, reads, org, "job")  # a job writes checkpoints: refused when the quota is full
    with sessions() as db:
        job = Job(
            id=new_id("ftjob"),
            org=org,
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            seed=42 if body.seed is None else body.seed,
            meta=body.metadata,
            method={"type": kind, kind: {"hyperparameters": asked}},
            hyperparameters=asked,
            phitune=options,
        )
        try:  # the options against the config schema, with placeholder sizes; the worker rebuilds it with real ones
            build_config(settings, job, choose_hyperparameters(asked, 100))
        except PhituneError as exc:
            key = re.match(r"job: ([\w.]+):", exc.problems[0]) if exc.problems else None  # the first bad key
            param = f"phitune.{key[1]}" if key else "phitune"
            raise ApiError(400, f"phitune options: {exc.one_line()}", param=param) from None
        db.add(job)
        db.flush()  # the job row first: the event refers to it (PostgreSQL checks the key at once)
        add_event(db, job.id, f"Validating training file: {job.training_file}")
        db.commit()
        return render(job)


@router.get("/fine_tuning/jobs", **schemas.documented(schemas.JobList, 400, 401))
async def list_jobs(
    request: Request, org: Org, reads: Reads, after: str | None = None, limit: int = limit_query(20)
) -> dict:
    metadata = {  # metadata[key]=value filters
        key[9:-1]: value
        for key, value in request.query_params.multi_items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    where = store.job_filter(org, metadata)
    with reads() as db:
        return page(db, Job, where, after=after, limit=limit, newest_first=True, render=render)


@router.get("/fine_tuning/jobs/{job_id}", **schemas.documented(schemas.Job, 401, 404))
async def retrieve_job(org: Org, reads: Reads, job_id: str) -> dict:
    with reads() as db:
        return render(get_job(db, org, job_id))


FINAL = tuple(s.value for s in status.FINAL)
NOT_RUNNING = frozenset({Status.VALIDATING, Status.QUEUED, Status.PAUSED})


@router.post("/fine_tuning/jobs/{job_id}/cancel", **schemas.documented(schemas.Job, 400, 401, 404))
def cancel_job(org: Org, sessions: Sessions, job_id: str) -> dict:
    with sessions() as db:
        job = get_job(db, org, job_id)
        # Nothing runs: cancelled now. Running: the worker stops the run within a poll interval.
        done = status.move(
            db, job.id, Status.CANCELLED, event="The job was cancelled", only_from=NOT_RUNNING, finished_at=now()
        )
        if not done and not status.request(db, job.id, status.CANCEL):
            db.rollback()
            job = get_job(db, org, job_id)
            raise ApiError(400, f"job {job_id} is already {job.status}", code="job_not_cancellable")
        db.commit()
        return render(get_job(db, org, job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause", **schemas.documented(schemas.Job, 400, 401, 404))
def pause_job(org: Org, sessions: Sessions, job_id: str) -> dict:
    with sessions() as db:
        job = get_job(db, org, job_id)
        done = status.move(db, job.id, Status.PAUSED, event="The job was paused", only_from=frozenset({Status.QUEUED}))
        if not done and not status.request(db, job.id, status.PAUSE):
            db.rollback()
            job = get_job(db, org, job_id)
            if job.requested == status.CANCEL:
                raise ApiError(400, f"job {job_id}: a cancel is already requested; the job ends cancelled")
            raise ApiError(400, f"job {job_id} is {job.status}; only a queued or running job can be paused")
        db.commit()
        return render(get_job(db, org, job_id))


@router.post("/fine_tuning/jobs/{job_id}/resume", **schemas.documented(schemas.Job, 400, 401, 404))
def resume_job(org: Org, sessions: Sessions, job_id: str) -> dict:
    with sessions() as db:
        job = get_job(db, org, job_id)
        event = "The job was resumed; it continues from its last checkpoint"
        if not status.move(
            db, job.id, Status.QUEUED, event=event, only_from=frozenset({Status.PAUSED}), requested=None
        ):
            raise ApiError(400, f"job {job_id} is {job.status}; only a paused job can be resumed")
        db.commit()
        return render(get_job(db, org, job_id))


def render_event(e: Event) -> dict:
    return {
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.type,
        "data": e.data,
    }


@router.get("/fine_tuning/jobs/{job_id}/events", **schemas.documented(schemas.EventList, 400, 401, 404))
async def list_events(
    org: Org, reads: Reads, job_id: str, after: str | None = None, limit: int = limit_query(20)
) -> dict:
    with reads() as db:
        get_job(db, org, job_id)
        return page(
            db, Event, [Event.job_id == job_id], after=after, limit=limit, newest_first=True, render=render_event
        )


def render_checkpoint(c: Checkpoint) -> dict:
    return {
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.model_name,
        "fine_tuning_job_id": c.job_id,
        "step_number": c.step,
        "metrics": c.metrics,
    }


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", **schemas.documented(schemas.CheckpointList, 400, 401, 404))
async def list_checkpoints(
    org: Org, reads: Reads, job_id: str, after: str | None = None, limit: int = limit_query(10)
) -> dict:
    with reads() as db:
        get_job(db, org, job_id)
        return page(
            db,
            Checkpoint,
            [Checkpoint.job_id == job_id, Checkpoint.deleted.is_(False)],
            after=after,
            limit=limit,
            newest_first=True,
            render=render_checkpoint,
        )
