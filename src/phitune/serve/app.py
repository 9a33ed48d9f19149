"""The FastAPI application: settings and database in `app.state`, one router per resource, the
OpenAI error shape for every failure, API keys checked on every request.

Read endpoints are `async def` and query inline on the event loop: an indexed read takes a few
hundred microseconds, less than handing the request to a thread, and 40 threadpool threads
trading the GIL under 32 clients cost more than the queries (p99 150 -> 80 ms while training;
with the rest of `serve_api`'s measures, 20-46 ms).
Writes stay in the threadpool: on SQLite they may wait for the write lock. `serve_api` runs one
or more copies of this app (`app_from_env`) in processes of their own."""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select

from phitune.errors import PhituneError
from phitune.serve.db import ApiKey, connect
from phitune.serve.errors import ApiError
from phitune.serve.settings import Settings


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """How `phitune keys` names a key without showing it: the start of its hash."""
    return key_hash[:12]


async def organization(request: Request) -> str:
    """The caller's organization from `Authorization: Bearer <key>`. With no key at all, a
    loopback server lets every caller in as the organization `local`; a server on another
    address never does (its last key may have been revoked)."""
    state = request.app.state
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    orgs = _key_orgs(state)  # read first: a request without a key must not meet an empty cache
    org = orgs.get(hash_key(key)) if key else None
    if org is None and not orgs and state.settings.open_when_keyless:
        return "local"
    if org is None:
        raise ApiError(401, "Incorrect API key provided." if key else "Missing API key: send Authorization: Bearer <key>.",
                       code="invalid_api_key")
    return org


KEYS_TTL = 5.0  # seconds a key table read is reused: keys created or revoked by `phitune keys` count within this


def _key_orgs(state) -> dict[str, str]:
    """key hash -> organization, re-read at most every KEYS_TTL seconds (not once per request)."""
    if time.monotonic() - state.keys_read_at > KEYS_TTL:
        with state.reads() as db:
            state.key_orgs = dict(db.execute(select(ApiKey.key_hash, ApiKey.org)).all())
        state.keys_read_at = time.monotonic()
    return state.key_orgs


Org = Annotated[str, Depends(organization)]


SETTINGS_ENV = "PHITUNE_SERVE_SETTINGS"  # how `serve_api` hands the settings to its API processes


def app_from_env() -> FastAPI:
    """The app factory each of uvicorn's API processes calls (`serve_api`)."""
    return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))


def create_app(settings: Settings) -> FastAPI:
    from phitune.serve.routes import chat, files, jobs, models

    settings.files_dir.mkdir(parents=True, exist_ok=True)
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    engine, sessions, reads = connect(settings.db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.dispose()

    app = FastAPI(title="phitune fine-tuning service", version="1", lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning API: files, fine_tuning.jobs, models, chat.completions.")
    app.state.settings, app.state.sessions, app.state.reads = settings, sessions, reads
    app.state.chat_cache = {}
    app.state.key_orgs, app.state.keys_read_at = {}, float("-inf")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug: still OpenAI's shape (uvicorn logs the traceback)
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details").body(),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(ApiError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param).body(), status_code=400)

    for module in (files, jobs, models, chat):
        app.include_router(module.router, prefix="/v1")
    return app


def listen(host: str, port: int):
    """The listening socket the API processes share. Made here, not by uvicorn: uvicorn's has
    protocol 0, so asyncio leaves Nagle on for its connections and every response waits for a
    delayed ACK (p50 44 ms whatever the load)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PhituneError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose another port") from None
    sock.set_inheritable(True)
    return sock


def serve_api(settings: Settings, sock, *, processes: int) -> None:
    """The API in `processes` child processes of this one, which keeps them alive (and, in
    `phitune serve`, runs the job worker: the API never shares its GIL with the worker, whose
    syncing otherwise put p99 at 37-57 ms instead of 20 under 32 clients). uvicorn runs on
    asyncio's own loop even where uvloop is installed: saturated by 32 clients, uvloop answered
    some connections late (p99 152 ms against 21 ms, same server and load)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    os.environ[SETTINGS_ENV] = settings.to_json()
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config("phitune.serve.app:app_from_env", factory=True, workers=processes, host=host, port=port,
                            log_level="warning", loop="asyncio")
    Multiprocess(config, sockets=[sock]).run()
