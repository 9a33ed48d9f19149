"""OpenAI list pages: `{"object": "list", "data", "has_more", "first_id", "last_id"}`, paged with
`after=<id>` by the table's `seq`, so ids are stable and pages never shift."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Query
from sqlalchemy import select

from phitune.serve.errors import ApiError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

MAX_LIMIT = 10000


def limit_query(default: int) -> int:
    """The `limit` query parameter of a list route: 1..MAX_LIMIT (else a 400 from the schema)."""
    return Query(default, ge=1, le=MAX_LIMIT, description="items per page")


def page(
    db: Session,
    model: Any,  # a table's ORM class (Job, File, Event, Checkpoint)
    where: list,
    *,
    after: str | None,
    limit: int,
    newest_first: bool,
    render: Callable[[Any], dict],
) -> dict:
    """One page of `model` rows on a read connection, rendered (`limit` checked by the route)."""
    stmt = select(model).where(*where)
    if after:
        anchor = db.scalar(select(model.seq).where(model.id == after, *where))
        if anchor is None:
            raise ApiError(400, f"after '{after}': no such item in this list", param="after")
        stmt = stmt.where(model.seq < anchor if newest_first else model.seq > anchor)
    stmt = stmt.order_by(model.seq.desc() if newest_first else model.seq.asc()).limit(limit + 1)
    rows = db.execute(stmt).all()
    data = [render(r) for r in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": len(rows) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
