"""Limits on the HTTP port's connections, which aiohttp does not set: how many it holds at
once, and how long a new connection may take to send its first request's headers.

Without them, sockets that send half a header block are held until aiohttp's keep-alive
timeout (minutes): a thousand of them cost a file descriptor and a task each. Each
connection's protocol is wrapped in a _Guarded proxy that passes everything through to
aiohttp's own and counts, times and closes; it needs nothing of aiohttp's internals.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

import orjson
from aiohttp import web

HEADERS_END = b"\r\n\r\n"
# How long a refused connection is read (and its bytes dropped) after its 503, so that a
# client still sending its request reads the 503 instead of a reset.
LINGER_S = 1.0


class ConnectionGuard:
    """A protocol factory for `loop.create_server`, around aiohttp's (`factory`): at most
    `max_connections` connections at once (more are answered 503 and closed), and a
    connection whose first request's headers have not arrived within `header_timeout`
    seconds is closed. Either 0: that limit off."""

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol], max_connections: int,
                 header_timeout: float) -> None:
        self._factory = factory
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        self.lingering = 0  # refused connections read until LINGER_S: at most max_connections

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(cast(asyncio.Protocol, self._factory()), self)


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with each connection behind a ConnectionGuard."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int,
                 header_timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port = host, port
        self._limits = max_connections, header_timeout

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner was set up
        self._server = await asyncio.get_running_loop().create_server(
            ConnectionGuard(server, *self._limits), self._host, self._port,
            ssl=self._ssl_context, backlog=self._backlog,
            # A TLS handshake comes before the first request: it gets the same time.
            ssl_handshake_timeout=(self._limits[1] or None) if self._ssl_context else None)


def _refusal(max_connections: int) -> bytes:
    body = orjson.dumps({"error": f"the server holds {max_connections} HTTP connections, its "
                                  "limit (--max-http-connections): retry later"})
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class _Guarded(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._admitted = False
        self._lingering = False
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the first request's last bytes, while its headers are awaited

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        guard = self._guard
        if guard.max_connections and guard.open >= guard.max_connections:
            self._transport.write(_refusal(guard.max_connections))
            # A lingering close: closing at once would answer the request's bytes still
            # arriving with a reset, which a client reads as a broken pipe, never the 503.
            if guard.lingering < guard.max_connections and self._transport.can_write_eof():
                guard.lingering += 1
                self._lingering = True
                self._transport.write_eof()
                self._timer = asyncio.get_running_loop().call_later(
                    LINGER_S, self._transport.close)
            else:
                self._transport.close()
            return
        self._admitted = True
        guard.open += 1
        if guard.header_timeout:
            self._timer = asyncio.get_running_loop().call_later(
                guard.header_timeout, self._transport.close)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._timer is not None:
            seen = self._tail + data
            if HEADERS_END in seen:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = seen[-(len(HEADERS_END) - 1):]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._lingering:
            self._guard.lingering -= 1
        if not self._admitted:
            return
        self._guard.open -= 1
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()
