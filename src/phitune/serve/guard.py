"""What a request must pass before the app reads a byte of its body: the Host a keyless server
answers to, the web origin of a state-changing request, the API key, the body's size, and the
pace at which it arrives. A pure ASGI middleware, outermost: a hostile client costs the server a
header parse, never a parsed body (FastAPI reads and parses a body before any dependency, the key
check included, would run).

Slow clients: `TimedHttpTools` closes a connection whose request headers do not arrive within
HEADER_TIMEOUT (uvicorn times only idle keep-alive connections); the body must keep arriving
(`--read-timeout` between chunks, at least MIN_BODY_RATE on average after the first read
timeout), else 408. uvicorn's `limit_concurrency` caps connections (`serve_api`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from phitune.serve.deps import caller_org, is_keyless
from phitune.serve.errors import ApiError
from phitune.serve.upload import FORM_SLACK

if TYPE_CHECKING:
    from phitune.serve.settings import Settings

HEADER_TIMEOUT = 10.0  # seconds from connection (or a request's first byte) to its last header
MIN_BODY_RATE = 1024  # bytes/s a body must average once the read timeout has passed
UPLOAD_PATH = "/v1/files"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# GETs that do work and keep its result (a GGUF file built and stored): guarded as changes of state.
WORKING_GETS = ("/gguf",)
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str, extra: list[str] | None = None) -> list[str]:
    """The names a keyless server answers to: loopback's, the --host it listens on, --allow-host's."""
    return sorted({*LOCAL_NAMES, host.strip("[]").lower(), *(h.strip("[]").lower() for h in extra or [])})


def host_name(host_header: str) -> str:
    """`example.org:8000` -> `example.org`; `[::1]:8000` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """The checks before the app, in order: Host (keyless servers), cross-site writes, API key
    (requests that carry a body), size, then the body's pace as it is read."""

    def __init__(self, app, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.hosts = set(allowed_hosts("127.0.0.1", settings.allowed_hosts))
        self.extra_hosts = self.hosts - set(LOCAL_NAMES)  # names an origin may have besides the Host asked for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            limit = self.check(scope, headers)
        except ApiError as exc:
            return await _answer(exc, scope, receive, send)
        if limit is None:
            return await self.app(scope, receive, send)
        await _Body(limit, self.settings.read_timeout).run(self.app, scope, receive, send)

    def check(self, scope, headers: Headers) -> int | None:
        """The byte limit for the request's body (None: it has none to read); ApiError to refuse."""
        state = scope["app"].state
        method, path = scope["method"], scope["path"]
        if host_name(headers.get("host", "")) not in self.hosts and is_keyless(state):
            raise ApiError(
                403,
                f"Host {headers.get('host', '')!r}: this server has no API keys and answers only to "
                f"{', '.join(sorted(self.hosts))}; start it with --allow-host NAME to add a name",
                code="host_not_allowed",
            )
        if method in SAFE_METHODS and not path.endswith(WORKING_GETS):
            return None
        _refuse_cross_site(headers, self.extra_hosts)
        if path.startswith(("/v1/", "/portal/")):
            caller_org(state, headers)  # 401 now, before the body is read
        limit = (
            self.settings.max_upload_bytes + FORM_SLACK
            if path == UPLOAD_PATH and method == "POST"
            else self.settings.max_request_bytes
        )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _too_large(limit, path, f" (Content-Length {length})")
        return limit


def _refuse_cross_site(headers: Headers, hosts: set[str]) -> None:
    """A state-changing request from a page on another origin (a browser says so in Sec-Fetch-Site
    and Origin; scripts and SDKs send neither) is refused: no form post or fetch from another site
    creates jobs or files here, with or without a key. The origin's host must be the Host asked
    for, or an --allow-host name (a proxy that rewrites Host); its scheme may differ (a proxy that
    ends TLS)."""
    site = headers.get("sec-fetch-site")
    origin = headers.get("origin")
    netloc = urlsplit(origin).netloc.lower() if origin and origin != "null" else None
    ours = netloc is not None and (netloc == headers.get("host", "").lower() or host_name(netloc) in hosts)
    if site in ("cross-site", "same-site") or (origin is not None and not ours):
        shown = origin or site
        raise ApiError(
            403,
            f"Origin {shown!r}: a request that changes state must come from this server's own pages "
            "or from a client outside a browser",
            code="cross_origin_refused",
        )


def _too_large(limit: int, path: str, detail: str = "") -> ApiError:
    what = "file" if path == UPLOAD_PATH else "request body"
    return ApiError(
        413,
        f"{what}: larger than this server's limit of {limit} bytes{detail}",
        param="file" if path == UPLOAD_PATH else None,
        code="file_too_large" if path == UPLOAD_PATH else "request_too_large",
    )


class _Body:
    """The body as the app reads it, counted and timed. Past the limit or the pace, the app is
    told the client left (it stops reading) and the client gets the 413 / 408 instead of whatever
    the app answers."""

    def __init__(self, limit: int, idle: float) -> None:
        self.limit, self.idle, self.received, self.done = limit, idle, 0, False
        self.failure: ApiError | None = None
        self.started = time.monotonic()

    async def run(self, app, scope, receive, send) -> None:
        async def guarded() -> dict:
            if self.done:  # the body is in: later receives wait for a disconnect, untimed
                return await receive()
            try:
                with anyio.fail_after(self.idle):
                    message = await receive()
            except TimeoutError:
                return self.fail(ApiError(408, f"the request body stalled for {self.idle:g} s"))
            if message["type"] != "http.request":
                return message
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            elapsed = time.monotonic() - self.started
            if self.received > self.limit:
                return self.fail(_too_large(self.limit, scope["path"]))
            if not self.done and elapsed > self.idle and self.received < MIN_BODY_RATE * elapsed:
                return self.fail(ApiError(408, f"the request body arrives slower than {MIN_BODY_RATE} bytes/s"))
            return message

        async def muted(message: dict) -> None:
            if self.failure is None:
                await send(message)

        try:
            await app(scope, guarded, muted)
        except Exception:
            if self.failure is None:
                raise
        if self.failure is not None:
            await _answer(self.failure, scope, receive, send)

    def fail(self, error: ApiError) -> dict:
        self.failure, self.done = error, True
        return {"type": "http.disconnect"}


async def _answer(error: ApiError, scope, receive, send) -> None:
    """The refusal, with the connection closed after it: the unread body is never read."""
    response = JSONResponse(error.body(), status_code=error.status_code, headers={"connection": "close"})
    await response(scope, receive, send)


class TimedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's headers: a client that
    connects and sends nothing, or drips its headers, is cut off after HEADER_TIMEOUT."""

    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
