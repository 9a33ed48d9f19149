"""`/portal/...`: the HTML pieces htmx swaps into the pages. Each one calls the API's own route
functions or queries with the caller's organization (the same `Org` dependency as `/v1`), so the
portal can show or do nothing the API would not; an API error is shown next to its form field."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import ValidationError

from phitune.serve import store
from phitune.serve.db import Job
from phitune.serve.deps import Org, Reads, ServerSettings, Sessions
from phitune.serve.errors import ApiError, validation_message
from phitune.serve.listing import page
from phitune.serve.portal.forms import FIELDS, METHODS, field_of, job_request
from phitune.serve.portal.render import html
from phitune.serve.routes import files, jobs, models
from phitune.serve.schemas import JobCreate

router = APIRouter(prefix="/portal", include_in_schema=False)
MAX_JOBS = 1000  # jobs one list shows (newest first)


def _jobs(reads, org: str, metadata: dict[str, str] | None = None, limit: int = MAX_JOBS) -> list[dict]:
    with reads() as db:
        listed = page(
            db,
            Job,
            store.job_filter(org, metadata or {}),
            after=None,
            limit=limit,
            newest_first=True,
            render=jobs.render,
        )["data"]
        ids = [j["id"] for j in listed]
        steps, totals = store.progress(db, ids)
    for j in listed:
        j["step"], j["total_steps"] = steps.get(j["id"]), totals.get(j["id"])
    return listed


@router.get("/jobs")
async def job_rows(reads: Reads, org: Org, status: str = "", meta_key: str = "", meta_value: str = ""):
    metadata = {meta_key.strip(): meta_value.strip()} if meta_key.strip() else {}
    listed = [j for j in _jobs(reads, org, metadata) if not status or j["status"] == status]
    return html("fragments/job_rows.html", jobs=listed, final=jobs.FINAL)


ACTIONS = {"cancel": jobs.cancel_job, "pause": jobs.pause_job, "resume": jobs.resume_job}


@router.post("/jobs/{job_id}/{action}")
def job_action(org: Org, sessions: Sessions, job_id: str, action: Literal["cancel", "pause", "resume"]):
    """The API's cancel / pause / resume; lists and summaries refresh on the `jobs-changed` event."""

    def act() -> str:
        return f"{job_id}: {action} requested (status {ACTIONS[action](org, sessions, job_id)['status']})"

    return _outcome(act, "jobs-changed")


def _outcome(act, event: str):
    """What an API action said (its message, or the API's error) as a notice, and the htmx event
    that refreshes whatever shows what it changed."""
    try:
        notice, error = act(), False
    except ApiError as exc:
        notice, error = exc.detail, True
    return html("fragments/notice.html", notice=notice, error=error, headers={"HX-Trigger": event})


@router.get("/jobs/{job_id}/summary")
async def job_summary(org: Org, reads: Reads, job_id: str):
    with reads() as db:
        row = jobs.get_job(db, org, job_id)
        job, options = jobs.render(row), row.phitune or {}
        results = [files.render(files.get_file(db, org, f)) for f in job["result_files"] or []]
    return html("fragments/job_summary.html", job=job, options=options, results=results, final=jobs.FINAL)


@router.get("/jobs/{job_id}/checkpoints")
async def job_checkpoints(org: Org, reads: Reads, job_id: str):
    listed = await jobs.list_checkpoints(org, reads, job_id, after=None, limit=1000)
    return html("fragments/checkpoints.html", checkpoints=listed["data"])


@router.get("/options/models")
async def model_options(
    request: Request, org: Org, kind: Literal["base", "all"] = "base", selected: str = "", none: bool = False
):
    listed = [m for m in models.catalogue(request, org) if kind == "all" or m["owned_by"] == "system"]
    return html("fragments/model_options.html", models=listed, selected=selected, with_none=none)


@router.get("/options/files")
async def file_options(org: Org, reads: Reads, selected: str = "", optional: bool = False):
    listed = await files.list_files(org, reads, purpose="fine-tune", after=None, limit=1000, order="desc")
    return html("fragments/file_options.html", files=listed["data"], selected=selected, optional=optional)


@router.get("/files/check")
def file_check(request: Request, org: Org, settings: ServerSettings, reads: Reads, model: str = "", method: str = ""):
    """phitune's validator on the chosen file (the form field `which` names) for the chosen
    model, every problem with its line."""
    which = request.query_params.get("which", "training_file")
    file_id = request.query_params.get(which if which in ("training_file", "validation_file") else "", "")
    if not file_id or not model:
        return html("fragments/check.html", check=None, error=None)
    kind = METHODS.get(method, ("supervised",))[0]
    try:
        check = files.check_file(org, settings, reads, file_id, model, kind, examples=3)
    except ApiError as exc:
        return html("fragments/check.html", check=None, error=exc.detail)
    return html("fragments/check.html", check=check, error=None)


FORM_LIMIT = 64 * 1024  # bytes of a portal form (files go to /v1/files, never through a form here)


async def _form(request: Request) -> dict[str, str]:
    if int(request.headers.get("content-length") or FORM_LIMIT + 1) > FORM_LIMIT:
        raise ApiError(413, f"the form is larger than {FORM_LIMIT} bytes (or has no Content-Length)")
    form = await request.form(max_files=0)
    return {k: v for k, v in form.items() if isinstance(v, str)}


@router.post("/jobs/request")
async def request_preview(request: Request, org: Org):  # noqa: ARG001 - the key is checked like everywhere
    """The exact request the form will send, as JSON and as the openai SDK call."""
    body = job_request(await _form(request))
    extra = body.pop("phitune", None)
    return html(
        "fragments/request.html",
        body=body,
        extra=extra,
        whole=json.dumps(body | ({"phitune": extra} if extra else {}), indent=2),
    )


@router.post("/jobs")
async def create_job(request: Request, org: Org, settings: ServerSettings, sessions: Sessions):
    """The API's job creation from the form; on success the browser goes to the job's page."""
    import anyio

    body = job_request(await _form(request))
    try:
        try:
            parsed = JobCreate.model_validate(body)
        except ValidationError as exc:
            param, message = validation_message([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
            raise ApiError(400, message, param=param) from None
        job = await anyio.to_thread.run_sync(jobs.create_job, parsed, org, settings, sessions, request.app.state.reads)
    except ApiError as exc:
        if exc.status_code == 401:
            raise
        return html("fragments/form_errors.html", fields=FIELDS, bad=field_of(exc.param), message=exc.detail)
    return html(
        "fragments/form_errors.html", fields=FIELDS, bad=None, message="", headers={"HX-Redirect": f"/jobs/{job['id']}"}
    )


@router.get("/models")
async def model_rows(request: Request, org: Org):
    return html("fragments/model_rows.html", models=models.catalogue(request, org))


@router.delete("/models/{model:path}")
def delete_model(request: Request, org: Org, model: str):
    def act() -> str:
        models.delete_model(request, org, model)
        return f"{model} deleted"

    return _outcome(act, "models-changed")


@router.get("/compare/choices")
async def compare_choices(request: Request, reads: Reads, org: Org):
    selected = set(request.query_params.getlist("jobs"))
    return html("fragments/compare_choices.html", jobs=_jobs(reads, org), selected=selected)


def _settings_of(job: Job, final: dict) -> dict:
    """One column of the comparison: what a run was asked to do, and how it ended."""
    out = {
        "model": job.model,
        "method": job.method.get("type"),
        "phitune method": (job.phitune or {}).get("method", {}).get("name", "lora"),
        **{f"hyperparameters.{k}": v for k, v in (job.hyperparameters or {}).items()},
        "seed": job.seed,
        "suffix": job.suffix,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        **{f"phitune.{k}": json.dumps(v) for k, v in (job.phitune or {}).items() if k != "method"},
        "status": job.status,
        "trained_tokens": job.trained_tokens,
    }
    return out | {f"final {k}": v for k, v in final.items() if v is not None and k not in ("step", "total_steps")}


@router.get("/compare/table")
async def compare_table(request: Request, reads: Reads, org: Org):
    ids = request.query_params.getlist("jobs")
    columns = []
    with reads() as db:
        for job_id in ids:
            job = jobs.get_job(db, org, job_id)
            last = store.last_metrics(db, job_id)
            columns.append((job_id, _settings_of(job, last or {})))
    keys = list(dict.fromkeys(k for _, c in columns for k in c))
    rows = [(k, [c.get(k) for _, c in columns]) for k in keys]
    return html("fragments/compare_table.html", ids=[i for i, _ in columns], rows=rows)
