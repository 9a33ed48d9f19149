"""/v1/files: upload (multipart), list, retrieve, content, check, delete. Stored as storage/files/<id>:
the uploaded name is shown back but never becomes a path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from phitune.errors import PhituneError
from phitune.serve import schemas, storage, store
from phitune.serve.db import File, new_id
from phitune.serve.deps import Org, Reads, ServerSettings, Sessions, require_served
from phitune.serve.errors import ApiError, not_found
from phitune.serve.listing import limit_query, page
from phitune.serve.storage import partial_path
from phitune.serve.upload import Upload

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

router = APIRouter(tags=["files"])
UPLOADABLE = ("fine-tune",)


def render(f: File) -> dict:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": f.status,
        "status_details": f.status_details,
        "expires_at": None,
    }


def get_file(db: Session, org: str, file_id: str, param: str | None = None) -> File:
    f = store.file(db, org, file_id)
    if f is None:
        raise not_found("file", file_id, param)
    return f


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(UPLOADABLE)},
                    },
                }
            }
        },
    }
}


@router.post("/files", **schemas.documented(schemas.FileObject, 400, 401, 413), openapi_extra=UPLOAD_BODY)
async def create_file(request: Request, org: Org, settings: ServerSettings, sessions: Sessions) -> dict:
    """Upload a file (multipart: `file`, `purpose`). Read as it arrives: refused at the limit."""
    import anyio

    file_id = new_id("file")
    final = settings.file_path(file_id, "fine-tune")
    left = await anyio.to_thread.run_sync(storage.room, settings, request.app.state.reads, org, "file")  # 403 first
    limit = settings.max_upload_bytes if left is None else min(settings.max_upload_bytes, left)
    try:
        upload = await Upload(partial_path(final), limit).read(request)
    except ApiError as exc:  # past the room left: the quota is what refused it
        if exc.status_code == 413 and limit != settings.max_upload_bytes:
            raise storage.quota_error(settings, (settings.org_quota_bytes or 0) - limit, "file") from None
        raise
    purpose = upload.fields.get("purpose")
    if purpose not in UPLOADABLE:
        upload.path.unlink(missing_ok=True)
        raise ApiError(400, f"purpose {purpose!r}: this server accepts {', '.join(UPLOADABLE)}", param="purpose")
    with sessions() as db:
        row = File(id=file_id, org=org, filename=upload.shown_name(), purpose=purpose, bytes=upload.size)
        db.add(row)
        db.commit()
    upload.path.replace(final)  # a final name always has a row (storage.recover finishes this after a kill)
    return render(row)


@router.get("/files", **schemas.documented(schemas.FileList, 400, 401))
async def list_files(
    org: Org,
    reads: Reads,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = limit_query(10000),
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    where = [File.org == org, File.deleted.is_(False)] + ([File.purpose == purpose] if purpose else [])
    with reads() as db:
        return page(db, File, where, after=after, limit=limit, newest_first=order == "desc", render=render)


@router.get("/files/{file_id}", **schemas.documented(schemas.FileObject, 401, 404))
async def retrieve_file(org: Org, reads: Reads, file_id: str) -> dict:
    with reads() as db:
        return render(get_file(db, org, file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the file's bytes",
        },
        **schemas.errors(401, 404),
    },
)
async def file_content(org: Org, reads: Reads, settings: ServerSettings, file_id: str) -> FileResponse:
    with reads() as db:
        f = get_file(db, org, file_id)
    return FileResponse(settings.file_path(f.id, f.purpose), media_type="application/octet-stream")


@router.get("/files/{file_id}/check", **schemas.documented(schemas.FileCheck, 400, 401, 404))
def check_file(
    org: Org,
    settings: ServerSettings,
    reads: Reads,
    file_id: str,
    model: str,
    method: Literal["supervised", "dpo"] = "supervised",
    examples: int = Query(3, ge=0, le=20, description="examples to render with their trained tokens"),
) -> dict:
    """phitune's extension: the file checked as a job on `model` would read it (every problem with
    its line), and a few examples through the model's chat template with the trained tokens marked."""
    from phitune.serve.filecheck import check_file as check

    require_served(settings, model)
    with reads() as db:
        f = get_file(db, org, file_id)
    if f.purpose != "fine-tune":
        raise ApiError(400, f"file '{file_id}': purpose is '{f.purpose}', not 'fine-tune'", param="file_id")
    try:
        return check(settings, file_id, model, method, examples)
    except PhituneError as exc:
        raise ApiError(400, exc.one_line(), param="model") from None


@router.delete("/files/{file_id}", **schemas.documented(schemas.Deleted, 401, 404))
def delete_file(org: Org, sessions: Sessions, settings: ServerSettings, file_id: str) -> dict:
    with sessions() as db:
        f = get_file(db, org, file_id)
        f.deleted = True
        db.commit()
    settings.file_path(file_id, f.purpose).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
