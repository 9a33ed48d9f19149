"""What a route depends on: the caller's organization (from its API key), the server's settings
and database sessions. Its own module so that routes and the app both import it, never each other."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Annotated, Callable

from fastapi import Depends, Request
from sqlalchemy import select

from phitune.serve.db import ApiKey
from phitune.serve.errors import ApiError
from phitune.serve.settings import Settings


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """How `phitune keys` names a key without showing it: the start of its hash."""
    return key_hash[:12]


KEYS_TTL = 5.0  # seconds a key table read is reused: keys created or revoked by `phitune keys` count within this


def _key_orgs(state) -> dict[str, str]:
    """key hash -> organization, re-read at most every KEYS_TTL seconds (not once per request)."""
    if time.monotonic() - state.keys_read_at > KEYS_TTL:
        with state.reads() as db:
            state.key_orgs = dict(db.execute(select(ApiKey.key_hash, ApiKey.org)).all())
        state.keys_read_at = time.monotonic()
    return state.key_orgs


def require_served(settings: Settings, model: str) -> None:
    """A 400 naming the served models, for a request whose `model` is not one of them."""
    if model not in settings.models:
        raise ApiError(
            400,
            f"model '{model}': not served here; available: {', '.join(sorted(settings.models)) or 'none'}",
            param="model",
            code="model_not_available",
        )


def is_keyless(state) -> bool:
    """No API key exists and the server lets everyone in as `local` (loopback servers only)."""
    return state.settings.open_when_keyless and not _key_orgs(state)


def caller_org(state, headers: Mapping[str, str]) -> str:
    """The caller's organization from `Authorization: Bearer <key>`. With no key at all, a
    loopback server lets every caller in as the organization `local`; a server on another
    address never does (its last key may have been revoked)."""
    header = headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    orgs = _key_orgs(state)  # read first: a request without a key must not meet an empty cache
    org = orgs.get(hash_key(key)) if key else None
    if org is None and not orgs and state.settings.open_when_keyless:
        return "local"
    if org is None:
        raise ApiError(
            401,
            "Incorrect API key provided." if key else "Missing API key: send Authorization: Bearer <key>.",
            code="invalid_api_key",
        )
    return org


async def organization(request: Request) -> str:
    return caller_org(request.app.state, request.headers)


# async: FastAPI would run a plain `def` dependency in its threadpool, a thread hop per request
# (more than the query it serves costs).
async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _sessions(request: Request) -> Callable:
    """Read-write sessions (writes run in the threadpool: on SQLite they may wait for the lock)."""
    return request.app.state.sessions


async def _reads(request: Request) -> Callable:
    """Read-only sessions on plain connections, for `async def` read endpoints."""
    return request.app.state.reads


Org = Annotated[str, Depends(organization)]
ServerSettings = Annotated[Settings, Depends(_settings)]
Sessions = Annotated[Callable, Depends(_sessions)]
Reads = Annotated[Callable, Depends(_reads)]
