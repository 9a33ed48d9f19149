"""The FastAPI application: settings and database in `app.state`, one router per resource, the
OpenAI error shape for every failure, API keys checked on every request, and (by default) a
worker thread in the same process so `phitune serve` alone runs jobs."""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import asynccontextmanager

from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select

from phitune.serve.db import ApiKey, connect
from phitune.serve.errors import ApiError
from phitune.serve.settings import Settings


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def organization(request: Request) -> str:
    """The caller's organization from `Authorization: Bearer <key>`. With no key created at all
    (a loopback-only server, checked at start) every caller is the organization `local`."""
    state = request.app.state
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    org = _key_orgs(state).get(hash_key(key)) if key else None
    if org is None and not state.key_orgs:
        return "local"
    if org is None:
        raise ApiError(401, "Incorrect API key provided." if key else "Missing API key: send Authorization: Bearer <key>.",
                       code="invalid_api_key")
    return org


KEYS_TTL = 5.0  # seconds a key table read is reused: keys created by `phitune keys create` count within this


def _key_orgs(state) -> dict[str, str]:
    """key hash -> organization, re-read at most every KEYS_TTL seconds (not once per request)."""
    if time.monotonic() - state.keys_read_at > KEYS_TTL:
        with state.reads() as db:
            state.key_orgs = {k.key_hash: k.org for k in db.scalars(select(ApiKey))}
        state.keys_read_at = time.monotonic()
    return state.key_orgs


Org = Annotated[str, Depends(organization)]


def create_app(settings: Settings, *, embedded_worker: bool = True) -> FastAPI:
    from phitune.serve.routes import chat, files, jobs, models

    settings.files_dir.mkdir(parents=True, exist_ok=True)
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    engine, sessions, reads = connect(settings.db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        thread = None
        if embedded_worker:
            from phitune.serve.worker import Worker

            worker = Worker(settings, sessions, name="embedded")
            thread = threading.Thread(target=worker.run, args=(stop,), daemon=True, name="phitune-worker")
            thread.start()
        yield
        stop.set()
        if thread:
            thread.join(timeout=30)
        engine.dispose()

    app = FastAPI(title="phitune fine-tuning service", version="1", lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning API: files, fine_tuning.jobs, models, chat.completions.")
    app.state.settings, app.state.sessions, app.state.reads, app.state.engine = settings, sessions, reads, engine
    app.state.chat_cache = {}
    app.state.key_orgs, app.state.keys_read_at = {}, float("-inf")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(ApiError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param).body(), status_code=400)

    for module in (files, jobs, models, chat):
        app.include_router(module.router, prefix="/v1")
    return app
