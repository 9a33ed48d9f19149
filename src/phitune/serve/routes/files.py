"""/v1/files: upload (multipart), list, retrieve, content, delete. Stored as storage/files/<id>:
the uploaded name is shown back but never becomes a path."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import bindparam, select

from phitune.serve.app import Org
from phitune.serve.db import File, first, new_id
from phitune.serve.errors import ApiError, not_found
from phitune.serve.listing import page

router = APIRouter(tags=["files"])
PURPOSES = ("fine-tune", "fine-tune-results")
UPLOADABLE = ("fine-tune",)


def render(f: File) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
            "purpose": f.purpose, "status": f.status, "status_details": f.status_details, "expires_at": None}


FILE = select(File).where(File.id == bindparam("id"), File.org == bindparam("org"), File.deleted.is_(False))


def get_file(db, org: str, file_id: str, param: str | None = None) -> File:
    f = first(db, FILE, id=file_id, org=org)
    if f is None:
        raise not_found("file", file_id, param)
    return f


@router.post("/files")
async def create_file(request: Request, org: Org, file: UploadFile, purpose: str = Form(...)) -> dict:
    settings = request.app.state.settings
    if purpose not in UPLOADABLE:
        raise ApiError(400, f"purpose '{purpose}': this server accepts {', '.join(UPLOADABLE)}", param="purpose")
    file_id = new_id("file")
    path = settings.file_path(file_id, purpose)
    size = 0
    try:
        with path.open("wb") as out:
            while chunk := await file.read(1 << 20):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise ApiError(413, f"file larger than the limit of {settings.max_upload_bytes} bytes", param="file")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    name = (file.filename or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload.jsonl"
    with request.app.state.sessions() as db:
        row = File(id=file_id, org=org, filename=name, purpose=purpose, bytes=size)
        db.add(row)
        db.commit()
        return render(row)


@router.get("/files")
async def list_files(request: Request, org: Org, purpose: str | None = None, after: str | None = None, limit: int = 10000,
               order: str = "desc") -> dict:
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order '{order}': use asc or desc", param="order")
    where = [File.org == org, File.deleted.is_(False)] + ([File.purpose == purpose] if purpose else [])
    with request.app.state.reads() as db:
        return page(db, File, where, after=after, limit=limit, newest_first=order == "desc", render=render)


@router.get("/files/{file_id}")
async def retrieve_file(request: Request, org: Org, file_id: str) -> dict:
    with request.app.state.reads() as db:
        return render(get_file(db, org, file_id))


@router.get("/files/{file_id}/content")
async def file_content(request: Request, org: Org, file_id: str):
    with request.app.state.reads() as db:
        f = get_file(db, org, file_id)
    return FileResponse(request.app.state.settings.file_path(f.id, f.purpose), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(request: Request, org: Org, file_id: str) -> dict:
    with request.app.state.sessions() as db:
        f = get_file(db, org, file_id)
        f.deleted = True
        db.commit()
    request.app.state.settings.file_path(file_id, f.purpose).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
