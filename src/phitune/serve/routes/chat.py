"""/v1/chat/completions on base models, fine-tunes and checkpoints, streaming or not.

Each base model is loaded once; fine-tunes are PEFT adapters loaded onto it by name and switched
per request (`set_adapter`, or the adapter disabled for the base itself). One generation at a
time per base (a lock, held by the generating thread alone): adapters are state of the shared model.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from phitune.errors import PhituneError
from phitune.outputs import checkpoint_dir
from phitune.serve import schemas
from phitune.serve.db import Checkpoint, Job, new_id
from phitune.serve.deps import Org
from phitune.serve.errors import ApiError, not_found
from phitune.serve.schemas import ChatRequest

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

router = APIRouter(tags=["chat"])
_LOAD_LOCK = threading.Lock()


class _ClosingStream(StreamingResponse):
    """A stream whose generator is closed as soon as the response ends, however it ends: a client
    that disconnects while a chunk is being sent would otherwise leave it suspended until garbage
    collection (and its generation running)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def resolve(request: Request, org: str, model: str) -> tuple[str, str | None, bool]:
    """(base model path, adapter dir or None, whether the base's own code may run) for a model id
    the caller may use."""
    settings = request.app.state.settings
    if model in settings.models:
        return settings.models[model], None, model in settings.trusted
    if model.startswith("ft:"):
        with request.app.state.reads() as db:
            job = db.execute(
                select(Job.id, Job.model).where(
                    Job.org == org, Job.fine_tuned_model == model, Job.model_deleted.is_(False)
                )
            ).first()
            if job is not None:
                run = settings.run_dir(job.id)
                trusted = job.model in settings.trusted
                if (run / "model").is_dir():
                    return str(run / "model"), None, trusted
                return settings.models[job.model], str(run / "adapter"), trusted
            ck = db.execute(
                select(Job.id, Job.model, Checkpoint.step)
                .join(Job, Job.id == Checkpoint.job_id)
                .where(Job.org == org, Checkpoint.model_name == model, Checkpoint.deleted.is_(False))
            ).first()
            if ck is not None:
                adapter = checkpoint_dir(settings.run_dir(ck.id) / "checkpoints", ck.step) / "adapter"
                return settings.models[ck.model], str(adapter), ck.model in settings.trusted
    raise not_found("model", model, "model")


class Served:
    """A base model in memory with the adapters loaded onto it so far."""

    def __init__(self, base: str, trusted: bool = False) -> None:
        from phitune.models import load_for_inference

        self.model, self.tokenizer = load_for_inference(base, safetensors_only=True, trust_remote_code=trusted)
        self.lock = threading.Lock()
        self.adapters: set[str] = set()
        self.longest_token = max(map(len, self.tokenizer.get_vocab()), default=1) or 1

    def select(self, adapter: str | None) -> ContextManager:
        """The model to run, with `adapter` active (None: the base); call under self.lock."""
        import contextlib

        from peft import PeftModel

        if adapter is None:
            return self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()
        name = "a" + str(abs(hash(adapter)))
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, adapter, adapter_name=name).eval()
        elif name not in self.adapters:
            self.model.load_adapter(adapter, adapter_name=name)
        self.adapters.add(name)
        self.model.set_adapter(name)
        return contextlib.nullcontext()


def served(request: Request, base: str, trusted: bool) -> Served:
    cache = request.app.state.chat_cache
    with _LOAD_LOCK:
        if base not in cache:
            try:
                cache[base] = Served(base, trusted)
            except PhituneError as exc:  # the server's own --model is broken: say which and why
                raise ApiError(500, str(exc), code="model_load_failed") from None
        return cache[base]


def _options(body: ChatRequest) -> dict:
    """The generation options of a checked chat request."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    clean = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    limit = body.max_completion_tokens or body.max_tokens or 256
    return {
        "messages": clean,
        "max_new_tokens": limit,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed or 0,
        "stop": stop,
    }


def _fit(target: "Served", options: dict, model_id: str) -> int:
    """The prompt's length in tokens. A prompt the model has no positions for is refused;
    max_tokens is shortened to what is left."""
    from phitune.generate import prompt_ids

    positions = getattr(target.model.config, "max_position_embeddings", None)
    if positions:
        # No token is longer than the vocabulary's longest entry: a prompt this long cannot fit,
        # refused without spending seconds of CPU tokenizing megabytes.
        chars = sum(len(m["content"]) for m in options["messages"])
        _refuse_past(positions, -(-chars // target.longest_token), model_id, "at least ")
    n = len(prompt_ids(target.tokenizer, options["messages"]))
    if positions:
        _refuse_past(positions, n, model_id)
        options["max_new_tokens"] = min(options["max_new_tokens"], positions - n)
    return n


def _refuse_past(positions: int, n: int, model_id: str, bound: str = "") -> None:
    if n >= positions:
        raise ApiError(
            400,
            f"messages: the prompt is {bound}{n} tokens; model '{model_id}' takes at most {positions} "
            "(prompt and reply together); shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )


def until_stop(pieces: Iterable[str], stops: list[str]) -> Iterator[str]:
    """The text pieces up to (not including) the first stop string. The tail that could still be
    the start of one is held back; returning early closes `pieces`, which ends the generation."""
    if not stops:
        yield from pieces
        return
    keep, held = max(map(len, stops)) - 1, ""
    try:
        for piece in pieces:
            held += piece
            cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if held[:cut]:
                    yield held[:cut]
                return
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep :]
        if held:
            yield held
    finally:
        pieces.close()


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

    target = await anyio.to_thread.run_sync(served, request, base, trusted)  # the first request loads the base: seconds
    prompt_tokens = await anyio.to_thread.run_sync(_fit, target, options, body.model)  # tokenizing: off the event loop
    completion_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        return _ClosingStream(
            _stream(target, adapter, options, body.model, completion_id, created, usage_of(body, prompt_tokens)),
            media_type="text/event-stream",
        )
    text, completion_tokens, finish = await _generate(target, adapter, options)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class Generation:
    """One reply generated on a thread of its own, which holds the base's lock for the generation
    alone: never while a client reads. The route takes the pieces from an asyncio queue and calls
    `cancel()` when it stops taking them (the client went away: RST, FIN, or the server cancelled
    the stream); a client that stops reading without closing is cut off after STALL_SECONDS of
    pieces waiting. Either way the model is free within a token or so, for every organization."""

    STALL_SECONDS = 10.0
    END = object()

    def __init__(self, target: Served, adapter: str | None, options: dict) -> None:
        import asyncio

        self.target, self.adapter, self.options = target, adapter, options
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped = threading.Event()  # set by the reader (cancel) or by the stall check
        self.taken_at = time.monotonic()
        threading.Thread(target=self._run, daemon=True, name="phitune-chat").start()

    def cancel(self) -> None:
        self.stopped.set()

    async def pieces(self):
        """The reply's text pieces; a generation error is raised here."""
        try:
            while True:
                item = await self.queue.get()
                self.taken_at = time.monotonic()
                if item is self.END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    def _run(self) -> None:
        from contextlib import closing

        from phitune.backends import TorchBackend

        target, options = self.target, self.options
        generation = {k: v for k, v in options.items() if k != "stop"}
        try:
            with target.lock:
                if self.stopped.is_set():  # the client left while waiting for the model
                    return
                self.taken_at = time.monotonic()  # the stall clock starts with the generation
                with target.select(self.adapter):
                    stream = TorchBackend(target.model, target.tokenizer).stream(**generation, cancel=self.stopped)
                    with closing(until_stop(stream, options["stop"])) as pieces:
                        for piece in pieces:
                            self._put(piece)
                            if self.stopped.is_set() or self._stalled():
                                break
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            self._put(exc)
        finally:
            self._put(self.END)

    def _stalled(self) -> bool:
        """Pieces wait unread and the reader has taken none for STALL_SECONDS."""
        return self.queue.qsize() > 0 and time.monotonic() - self.taken_at > self.STALL_SECONDS

    def _put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.stopped.set()


async def _generate(target: Served, adapter, options: dict):
    generation = Generation(target, adapter, options)
    text = "".join([piece async for piece in generation.pieces()]).strip()
    produced = len(target.tokenizer(text, add_special_tokens=False)["input_ids"])
    finish = "length" if produced >= options["max_new_tokens"] else "stop"
    return text, produced, finish


def usage_of(body: ChatRequest, prompt_tokens: int) -> int | None:
    """The prompt's token count when the stream is to end with a usage chunk, else None."""
    return prompt_tokens if body.stream_options and body.stream_options.include_usage else None


async def _stream(target: Served, adapter, options: dict, model_id, completion_id, created, prompt_tokens: int | None):
    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id}
        return "data: " + json.dumps({**body, "choices": choices, **extra}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    text = ""
    generation = Generation(target, adapter, options)
    try:
        async for piece in generation.pieces():
            if piece:
                text += piece
                yield chunk({"content": piece})
    finally:  # the client went away (the stream is cancelled or closed): stop generating for it
        generation.cancel()
    produced = len(target.tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
    yield chunk({}, finish="length" if produced >= options["max_new_tokens"] else "stop")
    if prompt_tokens is not None:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": produced,
            "total_tokens": prompt_tokens + produced,
        }
        yield chunk(None, usage=usage)
    yield "data: [DONE]\n\n"
