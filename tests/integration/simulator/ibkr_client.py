"""A minimal IBKR Client Portal WebSocket client written only from reference/ibkr-cp-websocket.md.

It knows nothing of the simulator's code: frames are JSON objects (text or binary), the client
sends ``TOPIC+TARGET+{json}`` text, ``tic`` alone, and ``{"session": ...}`` when asked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

Message = dict[str, Any]


class IbkrWsClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.raw: list[str | bytes] = []  # every frame, as received

    async def recv(self) -> Message:
        """Next frame decoded as JSON (``str`` or ``bytes``: both happen on real gateways)."""
        frame = await self.ws.recv()
        self.raw.append(frame)
        text = frame.decode("utf-8", errors="replace") if isinstance(frame, bytes) else frame
        decoded = json.loads(text)
        assert isinstance(decoded, dict)
        return decoded

    async def recv_until(
        self, predicate: Callable[[Message], bool], *, within_s: float = 5.0
    ) -> tuple[Message, list[Message]]:
        """Read until a message matches; return it and every message read before it."""
        before: list[Message] = []
        with anyio.fail_after(within_s):
            while True:
                message = await self.recv()
                if predicate(message):
                    return message, before
                before.append(message)

    async def handshake(self) -> list[Message]:
        """Read the unsolicited ``system``/``act``/``sts`` trio sent on connect."""
        topics: list[Message] = []
        with anyio.fail_after(5):
            while {m.get("topic") for m in topics} < {"system", "act", "sts"}:
                topics.append(await self.recv())
        return topics

    async def subscribe(self, conid: int, fields: list[str]) -> None:
        await self.ws.send(f"smd+{conid}+" + json.dumps({"fields": fields}))

    async def unsubscribe(self, conid: int) -> None:
        await self.ws.send(f"umd+{conid}+{{}}")

    async def tic(self) -> None:
        await self.ws.send("tic")

    async def until_closed(self, *, within_s: float = 5.0) -> ConnectionClosed:
        """Read until the server closes the connection; return how it closed."""
        with anyio.fail_after(within_s):
            while True:
                try:
                    await self.recv()
                except ConnectionClosed as closed:
                    return closed

    async def sync(self) -> list[Message]:
        """Send ``tic`` and return everything received before its answer."""
        await self.tic()
        _reply, before = await self.recv_until(lambda m: m.get("topic") == "tic")
        return before


def is_smd(conid: int) -> Callable[[Message], bool]:
    return lambda m: m.get("topic") == f"smd+{conid}"
