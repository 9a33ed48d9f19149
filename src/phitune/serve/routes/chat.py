"""/v1/chat/completions on base models, fine-tunes and checkpoints, streaming or not.

The model runs in the inference engine process (`phitune.inference`), shared by every API
process: requests for the base and for any number of fine-tunes of it are generated together,
each fine-tune's adapter applied to its own rows. This route resolves what the caller may use
(the served list, its own organization's fine-tunes) and relays the engine's events.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from phitune.inference.client import EngineClient, EngineGone
from phitune.outputs import checkpoint_dir
from phitune.serve import schemas, store
from phitune.serve.db import new_id
from phitune.serve.deps import Org
from phitune.serve.errors import ApiError, not_found
from phitune.serve.schemas import ChatRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

router = APIRouter(tags=["chat"])
_START_LOCK = threading.Lock()


class _ClosingStream(StreamingResponse):
    """A stream whose generator is closed as soon as the response ends, however it ends: a client
    that disconnects while a chunk is being sent would otherwise leave it suspended until garbage
    collection (and its generation running)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)  # our generator's
            if aclose is not None:
                await aclose()


def resolve(request: Request, org: str, model: str) -> tuple[str, str | None, bool]:
    """(base model path, adapter dir or None, whether the base's own code may run) for a model id
    the caller may use."""
    settings = request.app.state.settings
    if model in settings.models:
        return settings.models[model], None, model in settings.trusted
    if model.startswith("ft:"):
        with request.app.state.reads() as db:
            job = store.fine_tuned(db, org, model)
            if job is not None:
                run = settings.run_dir(job.id)
                trusted = job.model in settings.trusted
                if (run / "model").is_dir():
                    return str(run / "model"), None, trusted
                return settings.models[job.model], str(run / "adapter"), trusted
            ck = store.checkpoint_model(db, org, model)
            if ck is not None:
                adapter = checkpoint_dir(settings.run_dir(ck.id) / "checkpoints", ck.step) / "adapter"
                return settings.models[ck.model], str(adapter), ck.model in settings.trusted
    raise not_found("model", model, "model")


def engine(app: FastAPI) -> EngineClient:
    """The engine's client: the server's engine process, or (an app made without `phitune serve`,
    as in tests) one this app starts on its first chat request and stops with its lifespan."""
    settings = app.state.settings
    with _START_LOCK:
        if not settings.engine_socket:
            from phitune.inference.limits import Limits
            from phitune.inference.process import EngineProcess

            app.state.engine_process = EngineProcess(Limits(**settings.engine), settings.engine_dtype).start()
            settings.engine_socket = app.state.engine_process.socket
    return EngineClient(settings.engine_socket)


def _options(body: ChatRequest) -> dict:
    """The generation options of a checked chat request."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    clean = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    limit = body.max_completion_tokens or body.max_tokens or 256
    sampling = {
        "max_tokens": limit,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed or 0,
        "stop": stop,
    }
    return {"messages": clean, "sampling": sampling}


CHAT_RESPONSES = schemas.documented(
    schemas.ChatCompletion,
    400,
    401,
    404,
    500,
    description=(
        "a chat.completion, or with `stream: true` server-sent chat.completion.chunk events ending in `data: [DONE]`"
    ),
)
CHAT_RESPONSES["responses"][200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}


@router.post("/chat/completions", **CHAT_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request, org: Org) -> dict | StreamingResponse:
    options = _options(body)
    base, adapter, trusted = resolve(request, org, body.model)
    if adapter and not (Path(adapter) / "adapter_model.safetensors").is_file():  # never a pickle (.bin) on this path
        raise ApiError(404, f"model '{body.model}': its weights are gone from storage", param="model")
    import anyio

    client = await anyio.to_thread.run_sync(engine, request.app)  # the first request starts the engine: seconds
    events = client.stream(
        {"op": "generate", "model": body.model, "base": base, "trusted": trusted, "adapter": adapter, **options}
    )
    start = await _first(events)
    completion_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _ClosingStream(
            _stream(events, body.model, completion_id, created, start["prompt_tokens"], include_usage),
            media_type="text/event-stream",
        )
    text, done = "", None
    try:
        async for event in events:
            if event["event"] == "text":
                text += event["text"]
            elif event["event"] == "done":
                done = event
            else:
                raise _api_error(event)
    except EngineGone as exc:
        raise ApiError(503, str(exc), code="engine_unavailable") from None
    if done is None:  # the engine's stream ended without its last event
        raise ApiError(503, "the inference engine ended the reply unfinished", code="engine_unavailable")
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text.strip()},
                "finish_reason": _finish(done),
                "logprobs": None,
            }
        ],
        "usage": _usage(done),
    }


async def _first(events: AsyncGenerator[dict, None]) -> dict:
    """The engine's `start` event; an error before it (a bad prompt, an adapter for another base, an
    engine that is down) is the request's error."""
    try:
        event = await anext(events)
    except EngineGone as exc:
        raise ApiError(503, str(exc), code="engine_unavailable") from None
    if event["event"] != "start":
        await events.aclose()
        raise _api_error(event)
    return event


def _api_error(event: dict) -> ApiError:
    return ApiError(event.get("status", 500), event["message"], param=event.get("param"), code=event.get("code"))


def _finish(done: dict) -> str:
    return "length" if done["finish"] == "length" else "stop"


def _usage(done: dict) -> dict:
    return {
        "prompt_tokens": done["prompt_tokens"],
        "completion_tokens": done["completion_tokens"],
        "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
    }


async def _stream(
    events: AsyncGenerator[dict, None], model_id, completion_id, created, prompt_tokens: int, include_usage: bool
):
    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id}
        return "data: " + json.dumps({**body, "choices": choices, **extra}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in events:
            if event["event"] == "text":
                yield chunk({"content": event["text"]})
            elif event["event"] == "done":
                yield chunk({}, finish=_finish(event))
                if include_usage:
                    yield chunk(None, usage=_usage(event))
                yield "data: [DONE]\n\n"
            else:  # the status line is sent: the error goes in the stream, as OpenAI's does
                yield "data: " + json.dumps({"error": {"message": event["message"], "type": "server_error"}}) + "\n\n"
    except EngineGone as exc:
        yield "data: " + json.dumps({"error": {"message": str(exc), "type": "server_error"}}) + "\n\n"
    finally:  # the client went away (the stream is cancelled or closed): the engine stops for it
        await events.aclose()
