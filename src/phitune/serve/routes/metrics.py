"""/metrics: the inference engine's counters in Prometheus' text format (vLLM's and TGI's
convention). Aggregates only, no tenant's data; still behind an API key, as every route is."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from phitune.inference.client import EngineClient, EngineGone
from phitune.serve.deps import Org
from phitune.serve.errors import ApiError

router = APIRouter(tags=["metrics"])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def metrics(request: Request, org: Org) -> PlainTextResponse:
    socket = request.app.state.settings.engine_socket
    if not socket:  # no chat request has started an engine yet: nothing counted
        return PlainTextResponse("", media_type=CONTENT_TYPE)
    try:
        answer = await EngineClient(socket).call({"op": "metrics"})
    except EngineGone as exc:
        raise ApiError(503, str(exc), code="engine_unavailable") from None
    return PlainTextResponse(answer["text"], media_type=CONTENT_TYPE)
