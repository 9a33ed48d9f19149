"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints.

A job is checked as far as it can be at creation (model served, files yours and for fine-tuning,
hyperparameter ranges, phitune options against the config schema): a request that can never
succeed is a 400 now, not a failure minutes later. The data itself is validated by the worker
(`validating_files`), which names the file and line of every problem."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import bindparam, select

from phitune.errors import PhituneError
from phitune.serve.app import Org
from phitune.serve.db import Checkpoint, Event, Job, add_event, first, new_id, now
from phitune.serve.errors import ApiError, not_found
from phitune.serve.listing import page
from phitune.serve.routes.files import get_file

router = APIRouter(tags=["fine_tuning"])
RANGES = {"n_epochs": (1, 50), "batch_size": (1, 256)}
KNOWN = {"model", "training_file", "validation_file", "suffix", "seed", "metadata", "method", "hyperparameters",
         "integrations", "phitune"}


def render(job: Job) -> dict:
    hyper = {k: job.hyperparameters.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
    method: dict[str, Any] = {"type": job.method.get("type", "supervised")}
    method[method["type"]] = {"hyperparameters": {**hyper, **({"beta": job.hyperparameters.get("beta", "auto")}
                                                              if method["type"] == "dpo" else {})}}
    return {"id": job.id, "object": "fine_tuning.job", "created_at": job.created_at, "error": job.error,
            "fine_tuned_model": None if job.model_deleted else job.fine_tuned_model, "finished_at": job.finished_at,
            "hyperparameters": hyper, "model": job.model, "organization_id": job.org, "result_files": job.result_files,
            "seed": job.seed, "status": job.status, "trained_tokens": job.trained_tokens,
            "training_file": job.training_file, "validation_file": job.validation_file, "estimated_finish": job.estimated_finish,
            "integrations": [], "metadata": job.meta, "method": method, "user_provided_suffix": job.suffix}


JOB = select(Job).where(Job.id == bindparam("id"), Job.org == bindparam("org"))


def get_job(db, org: str, job_id: str) -> Job:
    job = first(db, JOB, id=job_id, org=org)
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


def _hyperparameters(body: dict) -> tuple[str, dict]:
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") not in ("supervised", "dpo"):
        raise ApiError(400, "method.type: this server runs supervised and dpo", param="method.type")
    kind = method["type"]
    asked = dict(body.get("hyperparameters") or {})
    asked |= ((method.get(kind) or {}).get("hyperparameters") or {})
    for key, value in asked.items():
        param = f"method.{kind}.hyperparameters.{key}"
        if key not in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"):
            raise ApiError(400, f"{param}: unknown hyperparameter", param=param)
        if value == "auto":
            continue
        if key in RANGES:
            lo, hi = RANGES[key]
            if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
                raise ApiError(400, f"{param}: {value!r} must be an integer in {lo}..{hi} or 'auto'", param=param)
        elif key == "beta" and not (isinstance(value, (int, float)) and 0 < value <= 2):
            raise ApiError(400, f"{param}: {value!r} must be in (0, 2] or 'auto'", param=param)
        elif key == "learning_rate_multiplier" and not (isinstance(value, (int, float)) and value > 0):
            raise ApiError(400, f"{param}: {value!r} must be a number > 0 or 'auto'", param=param)
    if kind == "dpo":
        asked.setdefault("beta", "auto")
    return kind, asked


@router.post("/fine_tuning/jobs")
async def create_job(request: Request, org: Org) -> dict:
    from phitune.serve.jobconfig import build_config, choose_hyperparameters

    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unknown parameter(s): {', '.join(unknown)}; phitune's own options go in extra_body "
                       "{'phitune': {...}}", param=unknown[0])
    settings = request.app.state.settings
    model = body.get("model")
    if model not in settings.models:
        raise ApiError(400, f"model '{model}': not served here; available: {', '.join(sorted(settings.models)) or 'none'}",
                       param="model", code="model_not_available")
    suffix, seed, meta = body.get("suffix"), body.get("seed"), body.get("metadata")
    if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or "/" in suffix or ":" in suffix):
        raise ApiError(400, "suffix: a string of at most 64 characters without '/' or ':'", param="suffix")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= 2**31 - 1):
        raise ApiError(400, "seed: an integer in 0..2147483647", param="seed")
    if meta is not None and not (isinstance(meta, dict) and len(meta) <= 16 and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in meta.items())):
        raise ApiError(400, "metadata: at most 16 string pairs (keys <= 64, values <= 512 characters)", param="metadata")
    options = body.get("phitune") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "phitune: an object of config sections, e.g. {\"method\": {\"name\": \"qlora\"}}", param="phitune")
    kind, asked = _hyperparameters(body)
    with request.app.state.sessions() as db:
        for param in ("training_file", "validation_file"):
            file_id = body.get(param)
            if file_id is None and param == "validation_file":
                continue
            if not isinstance(file_id, str):
                raise ApiError(400, f"{param}: a file id is required", param=param)
            f = get_file(db, org, file_id, param)
            if f.purpose != "fine-tune":
                raise ApiError(400, f"{param} '{file_id}': purpose is '{f.purpose}', not 'fine-tune'", param=param,
                               code="invalid_file_purpose")
        job = Job(id=new_id("ftjob"), org=org, model=model, training_file=body["training_file"],
                  validation_file=body.get("validation_file"), suffix=suffix, seed=42 if seed is None else seed, meta=meta,
                  method={"type": kind, kind: {"hyperparameters": asked}}, hyperparameters=asked, phitune=options)
        try:  # the options against the config schema, with placeholder sizes; the worker rebuilds it with real ones
            build_config(settings, job, choose_hyperparameters(asked, 100))
        except PhituneError as exc:
            detail = "; ".join([str(exc)] + list(getattr(exc, "problems", []) or []))
            raise ApiError(400, f"phitune options: {detail}", param="phitune") from None
        db.add(job)
        db.flush()  # the job row first: the event refers to it (PostgreSQL checks the key at once)
        add_event(db, job.id, f"Validating training file: {job.training_file}")
        db.commit()
        return render(job)


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request, org: Org, after: str | None = None, limit: int = 20) -> dict:
    where = [Job.org == org]
    for key, value in request.query_params.multi_items():  # metadata[key]=value filters
        if key.startswith("metadata[") and key.endswith("]"):
            where.append(Job.meta[key[9:-1]].as_string() == value)
    with request.app.state.reads() as db:
        return page(db, Job, where, after=after, limit=limit, newest_first=True, render=render)


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(request: Request, org: Org, job_id: str) -> dict:
    with request.app.state.reads() as db:
        return render(get_job(db, org, job_id))


FINAL = ("succeeded", "failed", "cancelled")


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(request: Request, org: Org, job_id: str) -> dict:
    with request.app.state.sessions() as db:
        job = get_job(db, org, job_id)
        if job.status in FINAL:
            raise ApiError(400, f"job {job_id} is already {job.status}", code="job_not_cancellable")
        if job.status in ("validating_files", "queued", "paused"):  # nothing runs: cancelled now
            job.status, job.finished_at = "cancelled", now()
            add_event(db, job.id, "The job was cancelled")
        else:
            job.requested = "cancel"  # the worker stops the run within a poll interval
        db.commit()
        return render(job)


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(request: Request, org: Org, job_id: str) -> dict:
    with request.app.state.sessions() as db:
        job = get_job(db, org, job_id)
        if job.status not in ("running", "queued"):
            raise ApiError(400, f"job {job_id} is {job.status}; only a queued or running job can be paused")
        if job.status == "queued":
            job.status = "paused"
            add_event(db, job.id, "The job was paused")
        else:
            job.requested = "pause"
        db.commit()
        return render(job)


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(request: Request, org: Org, job_id: str) -> dict:
    with request.app.state.sessions() as db:
        job = get_job(db, org, job_id)
        if job.status != "paused":
            raise ApiError(400, f"job {job_id} is {job.status}; only a paused job can be resumed")
        job.status, job.requested = "queued", None
        add_event(db, job.id, "The job was resumed; it continues from its last checkpoint")
        db.commit()
        return render(job)


def render_event(e: Event) -> dict:
    return {"id": e.id, "object": "fine_tuning.job.event", "created_at": e.created_at, "level": e.level,
            "message": e.message, "type": e.type, "data": e.data}


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(request: Request, org: Org, job_id: str, after: str | None = None, limit: int = 20) -> dict:
    with request.app.state.reads() as db:
        get_job(db, org, job_id)
        return page(db, Event, [Event.job_id == job_id], after=after, limit=limit, newest_first=True, render=render_event)


def render_checkpoint(c: Checkpoint) -> dict:
    return {"id": c.id, "object": "fine_tuning.job.checkpoint", "created_at": c.created_at,
            "fine_tuned_model_checkpoint": c.model_name, "fine_tuning_job_id": c.job_id, "step_number": c.step,
            "metrics": c.metrics}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(request: Request, org: Org, job_id: str, after: str | None = None, limit: int = 10) -> dict:
    with request.app.state.reads() as db:
        get_job(db, org, job_id)
        return page(db, Checkpoint, [Checkpoint.job_id == job_id, Checkpoint.deleted.is_(False)], after=after,
                    limit=limit, newest_first=True, render=render_checkpoint)
