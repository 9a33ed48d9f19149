"""/v1/models: the base models this server is configured with, then every succeeded fine-tune
and checkpoint of the caller's organization; a fine-tuned model can be deleted."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from phitune.serve import schemas, store
from phitune.serve.deps import Org
from phitune.serve.errors import ApiError, not_found
from phitune.serve.storage import remove_weights

router = APIRouter(tags=["models"])


def catalogue(request: Request, org: str) -> list[dict]:
    settings = request.app.state.settings
    out = [{"id": name, "object": "model", "created": 0, "owned_by": "system"} for name in sorted(settings.models)]
    with request.app.state.reads() as db:
        for name, created in store.models(db, org):
            out.append({"id": name, "object": "model", "created": created, "owned_by": org})
    return out


@router.get("/models", **schemas.documented(schemas.ModelList, 401))
async def list_models(request: Request, org: Org) -> dict:
    return {"object": "list", "data": catalogue(request, org)}


@router.get("/models/{model:path}", **schemas.documented(schemas.Model, 401, 404))
async def retrieve_model(request: Request, org: Org, model: str) -> dict:
    for m in catalogue(request, org):
        if m["id"] == model:
            return m
    raise not_found("model", model)


@router.delete("/models/{model:path}", **schemas.documented(schemas.Deleted, 400, 401, 404))
def delete_model(request: Request, org: Org, model: str) -> dict:
    if not model.startswith("ft:"):
        if model in request.app.state.settings.models:
            raise ApiError(
                400, f"model '{model}' is a base model of this server; only fine-tuned models can be deleted"
            )
        raise not_found("model", model)
    with request.app.state.sessions() as db:
        job = store.delete_model(db, org, model)
        if job is None:
            raise not_found("model", model)
        db.commit()
    remove_weights(request.app.state.settings, job.id)
    forget(request.app.state.settings.engine_socket, request.app.state.settings.run_dir(job.id))
    return {"id": model, "object": "model", "deleted": True}


def forget(socket: str, run: Path) -> None:
    """The engine drops the deleted model's adapters from memory (a sync route: its own loop)."""
    if not socket:
        return
    import asyncio

    from phitune.inference.client import EngineClient, EngineGone

    try:
        asyncio.run(EngineClient(socket).call({"op": "forget", "directory": str(run)}))
    except EngineGone:
        pass  # a restarted engine has nothing cached
