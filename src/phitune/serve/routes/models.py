"""/v1/models: the base models this server is configured with, then every succeeded fine-tune
and checkpoint of the caller's organization; a fine-tuned model can be deleted."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from phitune.serve.app import Org
from phitune.serve.db import Checkpoint, Job
from phitune.serve.errors import ApiError, not_found

router = APIRouter(tags=["models"])


def catalogue(request: Request, org: str) -> list[dict]:
    settings = request.app.state.settings
    out = [{"id": name, "object": "model", "created": 0, "owned_by": "system"} for name in sorted(settings.models)]
    with request.app.state.reads() as db:
        jobs = list(db.scalars(select(Job).where(Job.org == org, Job.status == "succeeded", Job.model_deleted.is_(False))
                               .order_by(Job.seq)))
        for job in jobs:
            out.append({"id": job.fine_tuned_model, "object": "model", "created": job.finished_at or job.created_at,
                        "owned_by": org})
        for ck in db.scalars(select(Checkpoint).join(Job, Job.id == Checkpoint.job_id)
                             .where(Job.org == org, Checkpoint.deleted.is_(False)).order_by(Checkpoint.seq)):
            out.append({"id": ck.model_name, "object": "model", "created": ck.created_at, "owned_by": org})
    return out


@router.get("/models")
def list_models(request: Request, org: Org) -> dict:
    return {"object": "list", "data": catalogue(request, org)}


@router.get("/models/{model:path}")
def retrieve_model(request: Request, org: Org, model: str) -> dict:
    for m in catalogue(request, org):
        if m["id"] == model:
            return m
    raise not_found("model", model)


@router.delete("/models/{model:path}")
def delete_model(request: Request, org: Org, model: str) -> dict:
    if not model.startswith("ft:"):
        if model in request.app.state.settings.models:
            raise ApiError(400, f"model '{model}' is a base model of this server; only fine-tuned models can be deleted")
        raise not_found("model", model)
    with request.app.state.sessions() as db:
        job = db.scalar(select(Job).where(Job.org == org, Job.fine_tuned_model == model, Job.model_deleted.is_(False)))
        if job is None:
            raise not_found("model", model)
        job.model_deleted = True
        for ck in db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)):
            ck.deleted = True
        db.commit()
    request.app.state.chat_cache.pop(model, None)
    return {"id": model, "object": "model", "deleted": True}
