"""GET /v1/fine_tuning/jobs/{id}/events/stream: a job's events as server-sent events, oldest
first, then live until the job ends (phitune's extension; the portal's charts and logs use it).

Every event carries its id (`id:` line), so a client that reconnects with `Last-Event-ID` (or
`?after=`) gets exactly what it missed; a reload without one replays the whole history. The job
itself is sent as an `event: job` message whenever it changes, and `event: end` closes a job
that reached a final state."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from phitune.serve import schemas, store
from phitune.serve.deps import Org, Reads
from phitune.serve.errors import ApiError
from phitune.serve.routes.jobs import FINAL, get_job, render, render_event

router = APIRouter(tags=["fine_tuning"])
BATCH = 500  # events read per query while catching up
HEARTBEAT_SECONDS = 15.0  # a comment line now and then keeps proxies from closing an idle stream


def _anchor(db, job_id: str, after: str | None) -> int:
    if not after:
        return 0
    seq = store.event_seq(db, job_id, after)
    if seq is None:
        raise ApiError(400, f"after '{after}': no such event of job {job_id}", param="after")
    return seq


def message(data: dict, *, event: str, id: str | None = None) -> str:
    return (f"id: {id}\n" if id else "") + f"event: {event}\ndata: {json.dumps(data)}\n\n"


STREAM = schemas.documented(schemas.Event, 400, 401, 404, description="the job's events as server-sent events")
STREAM["responses"][200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
STREAM.pop("response_model")


@router.get("/fine_tuning/jobs/{job_id}/events/stream", **STREAM)
async def stream_events(request: Request, org: Org, reads: Reads, job_id: str, after: str | None = None):
    after = request.headers.get("last-event-id") or after
    with reads() as db:
        get_job(db, org, job_id)
        seq = _anchor(db, job_id, after)
    poll = request.app.state.settings.poll_seconds

    async def events():
        nonlocal seq
        shown, quiet_since = None, time.monotonic()
        while not await request.is_disconnected():
            with reads() as db:
                rows = store.events_after(db, job_id, seq, BATCH)
                job = render(get_job(db, org, job_id))
            for e in rows:
                seq = e.seq
                yield message(render_event(e), event=e.type, id=e.id)
            if job != shown:
                shown = job
                yield message(job, event="job")
            if rows:
                quiet_since = time.monotonic()
                continue
            if job["status"] in FINAL:
                yield message({"status": job["status"]}, event="end")
                return
            if time.monotonic() - quiet_since > HEARTBEAT_SECONDS:
                quiet_since = time.monotonic()
                yield ": still running\n\n"
            await asyncio.sleep(poll)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
