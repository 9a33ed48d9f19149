"""API keys in the service's database: created (only the hash is stored), listed by id,
revoked. `phitune keys` calls these; the queries stay with the service."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from phitune.errors import PhituneError
from phitune.serve.db import ApiKey, connect
from phitune.serve.deps import hash_key, key_id

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker


def any_key(sessions: sessionmaker) -> bool:
    with sessions() as db:
        return db.scalar(select(ApiKey.seq).limit(1)) is not None


def check_org(org: str | None) -> str:
    if not org or not all(c.isalnum() or c in "-_" for c in org) or len(org) > 64:
        raise PhituneError(f"--org {org!r}: letters, digits, '-' and '_' (at most 64)")
    return org


def create_key(db_url: str, org: str | None) -> tuple[str, str]:
    """(the new key, its id) for organization `org`."""
    check_org(org)
    _, sessions, _ = connect(db_url)
    key = "sk-phitune-" + secrets.token_urlsafe(32)
    with sessions() as db:
        db.add(ApiKey(org=org, key_hash=hash_key(key)))
        db.commit()
    return key, key_id(hash_key(key))


def list_keys(db_url: str, org: str | None = None) -> list[tuple[str, str, float]]:
    """(key id, organization, created at) of every key, oldest first; of one organization if given."""
    _, sessions, _ = connect(db_url)
    with sessions() as db:
        keys = list(db.scalars(select(ApiKey).order_by(ApiKey.seq)))
    return [(key_id(k.key_hash), k.org, k.created_at) for k in keys if org in (None, k.org)]


def revoke_key(db_url: str, key_or_id: str) -> str:
    """Delete the one key with this id (or this key); returns its id."""
    ident = key_id(hash_key(key_or_id)) if key_or_id.startswith("sk-") else key_or_id.lower()
    if len(ident) < 8:
        raise PhituneError(f"{key_or_id!r}: give a key id from `phitune keys list` (12 hex digits) or the key itself")
    _, sessions, _ = connect(db_url)
    with sessions() as db:
        hashes = list(db.scalars(select(ApiKey.key_hash).where(ApiKey.key_hash.startswith(ident))))
        if len(hashes) != 1:
            raise PhituneError(
                f"{key_or_id!r}: {'no key has' if not hashes else f'{len(hashes)} keys have'} this id; "
                "see `phitune keys list`"
            )
        db.execute(delete(ApiKey).where(ApiKey.key_hash == hashes[0]))
        db.commit()
    return key_id(hashes[0])
