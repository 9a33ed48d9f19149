"""The FastAPI application: settings and database in `app.state`, one router per resource, the
OpenAI error shape for every failure, API keys checked on every request.

Read endpoints are `async def` and query inline on the event loop: an indexed read takes a few
hundred microseconds, less than handing the request to a thread, and 40 threadpool threads
trading the GIL under 32 clients cost more than the queries (p99 150 -> 80 ms while training;
with the rest of `serve_api`'s measures, 20-46 ms).
Writes stay in the threadpool: on SQLite they may wait for the write lock. `serve_api` runs one
or more copies of this app (`app_from_env`) in processes of their own."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from phitune.errors import PhituneError
from phitune.serve.db import connect
from phitune.serve.errors import ApiError, validation_message
from phitune.serve.guard import Guard
from phitune.serve.settings import Settings

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator

log = logging.getLogger("phitune.serve")


API_PREFIX = "/v1"
SETTINGS_ENV = "PHITUNE_SERVE_SETTINGS"  # how `serve_api` hands the settings to its API processes


def app_from_env() -> FastAPI:
    """The app factory each of uvicorn's API processes calls (`serve_api`)."""
    from phitune.inference.process import die_with_parent

    die_with_parent()  # an orphan would keep the port: a restart would fail with "Address already in use"
    return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))


def create_app(settings: Settings) -> FastAPI:
    from phitune.serve.portal.pages import mount as mount_portal
    from phitune.serve.routes import chat, exports, files, jobs, metrics, models, stream

    settings.files_dir.mkdir(parents=True, exist_ok=True)
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    engine, sessions, reads = connect(settings.db_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()
        owned = getattr(app.state, "engine_process", None)  # started by this app's first chat request
        if owned is not None:
            owned.stop()

    app = FastAPI(
        title="phitune fine-tuning service",
        version="1",
        lifespan=lifespan,
        description="OpenAI-compatible fine-tuning API: files, fine_tuning.jobs, models, chat.completions.",
        docs_url=None,  # the portal serves /docs from its vendored Swagger UI (FastAPI's loads a CDN)
        redoc_url=None,
    )
    app.state.settings, app.state.sessions, app.state.reads = settings, sessions, reads
    app.state.key_orgs, app.state.keys_read_at = {}, float("-inf")

    @app.exception_handler(StarletteHTTPException)  # ApiError, and Starlette's own 404 / 405
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, ApiError):
            return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
        headers = {}
        if exc.status_code == 405:
            allowed = _allowed_methods(routers, request.url.path)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on {request.url.path}; use {' or '.join(allowed)}"
        elif exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (the API is under /v1; see /docs)"
        else:
            message = str(exc.detail)
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        param, message = validation_message(exc.errors())
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    app.add_middleware(_Unexpected)
    app.add_middleware(Guard, settings=settings)  # added last: outermost, before any body is read
    routers = [module.router for module in (files, jobs, exports, stream, models, chat)]
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(metrics.router)  # /metrics, where Prometheus scrapers look
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented override
    mount_portal(app)
    return app


class _Unexpected:
    """A bug answered as a 500 in OpenAI's shape, logged, and not raised further: uvicorn closes
    the connection of a request whose app raised, so the client's next request on that keep-alive
    connection would be reset (Starlette's catch-all handler re-raises)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a response
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details").body()
            await JSONResponse(body, status_code=500)(scope, receive, send)


def _allowed_methods(routers, path: str) -> list[str]:
    """Every method some route takes on this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    scope = {"type": "http", "path": path.removeprefix(API_PREFIX), "root_path": "", "method": "GET"}
    for router in routers:
        for route in router.routes:
            if route.matches(scope)[0] != Match.NONE:
                methods |= set(route.methods)
    return sorted(methods - {"HEAD"})


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 (this API answers a bad request with 400 in OpenAI's shape),
    each 200 body the model `schemas.documented` names."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                for body in operation.get("responses", {}).get("200", {}).get("content", {}).values():
                    if "$ref" in body.get("schema", {}):  # the documented model, not the `dict` it is served as
                        body["schema"] = {"$ref": body["schema"]["$ref"]}
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def listen(host: str, port: int) -> socket.socket:
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
        raise PhituneError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose another port"
        ) from None
    sock.set_inheritable(True)
    return sock


def serve_api(settings: Settings, sock: socket.socket, *, processes: int) -> None:
    """The API in `processes` child processes of this one, which keeps them alive (and, in
    `phitune serve`, runs the job worker: the API never shares its GIL with the worker, whose
    syncing otherwise put p99 at 37-57 ms instead of 20 under 32 clients). uvicorn runs on
    asyncio's own loop even where uvloop is installed: saturated by 32 clients, uvloop answered
    some connections late (p99 152 ms against 21 ms, same server and load)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from phitune.serve.guard import TimedHttpTools

    os.environ[SETTINGS_ENV] = settings.to_json()
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        "phitune.serve.app:app_from_env",
        factory=True,
        workers=processes,
        host=host,
        port=port,
        log_level="warning",
        loop="asyncio",
        http=TimedHttpTools,  # request headers within guard.HEADER_TIMEOUT
        limit_concurrency=settings.max_connections,  # connections and requests past it: 503 at once
        timeout_graceful_shutdown=10,  # SIGTERM ends open streams after 10 s, never waits on a client
    )
    Multiprocess(config, sockets=[sock]).run()
