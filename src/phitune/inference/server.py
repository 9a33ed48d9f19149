"""The engine process: every base model the service serves, once, behind a Unix socket that every
API process of the server talks to (`client.py`).

The protocol is JSON lines. A client sends one request line and reads lines back:
- `{"op": "generate", "base", "trusted", "adapter", "messages", "sampling", "model"}` ->
  `{"event": "start", "prompt_tokens", "max_tokens"}`, then `{"event": "text", "text"}` lines,
  then `{"event": "done", "finish", "completion_tokens"}`; or at any point one
  `{"event": "error", "status", "message", "param", "code"}`. Closing the connection cancels.
- `{"op": "metrics"}` -> `{"text": <Prometheus text>}`;
  `{"op": "forget", "directory"}` -> `{"ok": true}` (a deleted model's adapters leave memory).

The socket lives in a directory only this user can open; requests come from the API processes,
which resolved every path from the server's own settings and database, never from a client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from phitune.errors import PhituneError
from phitune.inference.engine import Engine, Event
from phitune.inference.limits import Limits
from phitune.inference.metrics import Metrics
from phitune.inference.sampling import Sampling

LINE_LIMIT = 64 * 2**20  # a request line: the API already capped the body at --max-request-mb


class Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.body = {"event": "error", "status": status, "message": message, "param": param, "code": code}


class Served:
    """A base model in the engine process: its engine, tokenizer and prompt limits."""

    def __init__(self, base: str, trusted: bool, limits: Limits, dtype: str, metrics: Metrics, name: str) -> None:
        from phitune.inference.load import load_model

        model, self.tokenizer = load_model(base, trusted=trusted, dtype=dtype)
        self.engine = Engine(model, self.tokenizer, limits=limits, metrics=metrics.view(model=name), name=name)
        self.longest_token = max(map(len, self.tokenizer.get_vocab()), default=1) or 1

    def prompt(self, messages: list[dict], sampling: Sampling, model_id: str) -> list[int]:
        """The prompt's token ids. A prompt the model has no positions for is refused (before
        tokenizing megabytes when its characters alone prove it); max_tokens is shortened to what
        the window and the KV cache leave."""
        from phitune.inference.prompts import prompt_ids

        positions = self.engine.positions or 2**31
        chars = sum(len(m["content"]) for m in messages)
        _refuse_past(positions, -(-chars // self.longest_token), model_id, "at least ")
        ids = prompt_ids(self.tokenizer, messages)
        _refuse_past(positions, len(ids), model_id)
        room = min(positions, self.engine.pool.capacity_tokens) - len(ids)
        if room < 1:
            raise Refused(
                400,
                f"the prompt is {len(ids)} tokens; the server's KV cache holds {self.engine.pool.capacity_tokens} "
                "(phitune serve --kv-cache-mb): shorten the conversation",
                "messages",
                "context_length_exceeded",
            )
        sampling.max_tokens = min(sampling.max_tokens, room)
        return ids


def _refuse_past(positions: int, n: int, model_id: str, bound: str = "") -> None:
    if n >= positions:
        raise Refused(
            400,
            f"messages: the prompt is {bound}{n} tokens; model '{model_id}' takes at most {positions} "
            "(prompt and reply together); shorten the conversation",
            "messages",
            "context_length_exceeded",
        )


class EngineServer:
    def __init__(self, limits: Limits, dtype: str) -> None:
        self.limits, self.dtype = limits, dtype
        self.metrics = Metrics()
        self.served: dict[tuple[str, bool], Served] = {}
        self.loading: dict[tuple[str, bool], asyncio.Lock] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            op = request.get("op")
            if op == "generate":
                await self.generate(request, reader, writer)
            elif op == "metrics":
                await _send(writer, {"text": self.metrics.render()})
            elif op == "forget":
                await self.forget(request["directory"])
                await _send(writer, {"ok": True})
        except Refused as exc:
            await _send(writer, exc.body)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the API process went away: nothing to answer
        except Exception as exc:  # noqa: BLE001 - a bug or a model's own error (its chat template) fails one request
            print(f"phitune engine: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            try:
                await _send(writer, {"event": "error", "status": 500, "message": f"{type(exc).__name__}: {exc}"})
            except ConnectionError:
                pass
        finally:
            writer.close()

    async def forget(self, directory: str) -> None:
        """A deleted model leaves memory: its adapters, or the whole model of a full fine-tune."""
        inside = directory.rstrip("/") + "/"
        for key, served in list(self.served.items()):
            if key[0] == directory or key[0].startswith(inside):
                del self.served[key]
                await asyncio.to_thread(served.engine.close)  # requests still on it end with an error
            else:
                served.engine.forget(directory)

    async def base(self, base: str, trusted: bool, model_id: str) -> Served:
        key = (base, trusted)
        lock = self.loading.setdefault(key, asyncio.Lock())
        async with lock:  # one load per base, however many requests arrive meanwhile
            if key not in self.served:
                name = model_id if not model_id.startswith("ft:") else Path(base).name
                try:
                    self.served[key] = await asyncio.to_thread(
                        Served, base, trusted, self.limits, self.dtype, self.metrics, name
                    )
                except PhituneError as exc:
                    raise Refused(500, str(exc), code="model_load_failed") from None
        return self.served[key]

    async def generate(self, request: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = await self.base(request["base"], bool(request.get("trusted")), request["model"])
        sampling = Sampling(**request["sampling"])
        prompt = await asyncio.to_thread(served.prompt, request["messages"], sampling, request["model"])
        loop, events = asyncio.get_running_loop(), asyncio.Queue[Any]()

        def sink(event: Event) -> None:  # the engine's thread: hand over, never block
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = served.engine.submit(prompt, sampling, sink, adapter=request.get("adapter"))
        except PhituneError as exc:
            raise Refused(400, str(exc), "max_tokens") from None
        gone = asyncio.ensure_future(reader.read(1))  # EOF: the API process closed the request
        try:
            await _send(writer, {"event": "start", "prompt_tokens": len(prompt), "max_tokens": sampling.max_tokens})
            while True:
                take = asyncio.ensure_future(events.get())
                await asyncio.wait({take, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not take.done():
                    take.cancel()
                    return
                event = take.result()
                if event.kind == "text":
                    await _send(writer, {"event": "text", "text": event.text})
                elif event.kind == "done":
                    await _send(writer, {"event": "done", "finish": event.finish, **_usage(event)})
                    return
                else:
                    await _send(
                        writer, {"event": "error", "status": event.status, "message": _public(event.text, request)}
                    )
                    return
        finally:
            handle.cancel()
            gone.cancel()


def _public(message: str, request: dict) -> str:
    """An error as the tenant sees it: its model's id where the engine named the server's path."""
    adapter = request.get("adapter")
    return message.replace(adapter, f"model '{request['model']}'") if adapter else message


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}


async def _send(writer: asyncio.StreamWriter, body: dict) -> None:
    writer.write(json.dumps(body).encode() + b"\n")
    await writer.drain()


async def _serve(path: str, limits: Limits, dtype: str) -> None:
    server = EngineServer(limits, dtype)
    old = os.umask(0o077)
    try:
        listener = await asyncio.start_unix_server(server.handle, path=path, limit=LINE_LIMIT)
    finally:
        os.umask(old)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)  # the parent waits for this line before sending requests
    os.dup2(2, 1)  # then nobody reads stdout: whatever a library prints goes to the log, never fills a pipe
    async with listener:
        await stop.wait()
    for served in server.served.values():
        served.engine.close()
    # Its socket and directory go with it (a parent killed with -9 never removes them).
    Path(path).unlink(missing_ok=True)
    if Path(path).parent.name.startswith("phitune-engine-"):
        with contextlib.suppress(OSError):
            Path(path).parent.rmdir()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m phitune.inference.server")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--limits", default="{}", help="JSON of inference.engine.Limits fields")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    from phitune.inference.process import die_with_parent

    die_with_parent()
    limits = Limits(**json.loads(args.limits))
    try:
        asyncio.run(_serve(args.socket, limits, args.dtype))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
