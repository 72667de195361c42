"""A TCP proxy for outage tests, after asyncpg's ``_testbase/fuzzer.py::TCPFuzzingProxy``.

``cut()`` closes every proxied connection and refuses new ones (accepted, then closed at once)
until ``restore()``. It runs as a task in the test's own task group.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.abc import SocketStream, TaskGroup


class TcpProxy:
    def __init__(self, backend_host: str, backend_port: int) -> None:
        self.backend_host = backend_host
        self.backend_port = backend_port
        self.port = 0
        self.connected = True
        self.accepted = 0
        self._scopes: set[anyio.CancelScope] = set()
        self._listener_scope = anyio.CancelScope()

    async def start(self, tg: TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def serve() -> None:
            with self._listener_scope:
                async with listener:
                    await listener.serve(self._handle)

        tg.start_soon(serve)

    def route(self, dsn: str) -> str:
        """``dsn`` (user, password, database kept) going through this proxy, with
        ``sslmode=disable`` unless it names a mode.

        Why: under the default ``sslmode=prefer`` asyncpg opens each connection with an SSLRequest
        through ``TLSUpgradeProto``; a connect attempt cancelled just as a cut proxy closes the
        socket leaves that protocol's future holding ``ConnectionError('unexpected
        connection_lost() call')`` with no one to retrieve it (MagicStack/asyncpg#1211, #1310), and
        the event loop's handler reports it, which fails an anyio test. Seen once against the
        system PostgreSQL (which offers TLS). The outage tests are about outages, not TLS.
        """
        parts = urlsplit(dsn)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        query = parts.query
        if "sslmode=" not in query:
            query = f"{query}&sslmode=disable" if query else "sslmode=disable"
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def cut(self) -> None:
        """Drop every live connection and refuse new ones."""
        self.connected = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.connected = True

    def stop(self) -> None:
        self.cut()
        self._listener_scope.cancel()

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            if not self.connected:
                return
            self.accepted += 1
            try:
                backend = await anyio.connect_tcp(self.backend_host, self.backend_port)
            except OSError:
                return
            async with backend:
                with anyio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._pipe, client, backend, scope)
                            tg.start_soon(self._pipe, backend, client, scope)
                    finally:
                        self._scopes.discard(scope)

    @staticmethod
    async def _pipe(src: SocketStream, dst: SocketStream, scope: anyio.CancelScope) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            async for chunk in src:
                await dst.send(chunk)
        scope.cancel()
