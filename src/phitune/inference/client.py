"""An API process's side of the engine socket (`server.py` has the protocol)."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncGenerator

from phitune.errors import PhituneError

CONNECT_SECONDS = 30.0  # how long a request waits for an engine that is (re)starting


class EngineGone(PhituneError):
    """The engine process ended before the reply did (it crashed, or is restarting)."""


class EngineClient:
    def __init__(self, socket: str) -> None:
        self.socket = socket

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_SECONDS
        while True:
            try:
                return await asyncio.open_unix_connection(self.socket, limit=2**24)
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise EngineGone("the inference engine is not running; try again shortly") from None
                await asyncio.sleep(0.2)

    async def stream(self, request: dict) -> AsyncGenerator[dict, None]:
        """The engine's event lines for one request. Closing this generator (a client that went
        away) closes the connection, which cancels the request in the engine."""
        reader, writer = await self._open()
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    raise EngineGone("the inference engine stopped during this request; try again")
                event = json.loads(line)
                yield event
                if event.get("event") in ("done", "error"):
                    return
        except ConnectionError:
            raise EngineGone("the inference engine stopped during this request; try again") from None
        finally:
            writer.close()

    async def call(self, request: dict) -> dict:
        """A one-line answer (metrics, forget)."""
        reader, writer = await self._open()
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        except ConnectionError:
            line = b""
        finally:
            writer.close()
        if not line:
            raise EngineGone("the inference engine stopped during this request; try again")
        return json.loads(line)
