"""Caps on the gRPC calls a server holds at once: health Watch streams have a cap of their
own, and every other call shares --max-concurrent-rpcs.

grpc.aio's own `maximum_concurrent_rpcs` counts every call, so idle Watch streams (open
to anyone, and never ending by themselves) could take every slot and refuse all inference.
This interceptor runs before the request message is read, as grpc.aio's limiter does, and
counts a call until the task serving it ends, however it ends. A refused call is answered
RESOURCE_EXHAUSTED at once, without reading its message, and reported like any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from service.health import WATCH
from service.protocol.status import OnDone, report

# Called with True when the calls (Watch streams aside) reach their cap, so that nothing
# more is admitted, and with False once a tenth of the slots are free again (not at each
# call that ends at the cap, so a saturated server does not flap its readiness).
OnFull = Callable[[bool], None]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class CallLimits(grpc.aio.ServerInterceptor):
    """At most `calls` calls that are not Watch streams and `watches` Watch streams at once
    (0: no limit). Install it first (outermost)."""

    def __init__(self, calls: int, watches: int, on_done: OnDone | None = None,
                 on_full: OnFull | None = None) -> None:
        self._limits = {False: calls, True: watches}
        self._held = {False: 0, True: 0}
        self._resume = max(0, calls - max(1, calls // 10))
        self._full = False
        self._on_done = on_done
        self._on_full = on_full

    @property
    def full(self) -> bool:
        """Whether calls (Watch streams aside) are at their cap."""
        return self._full

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        watch = details.method == WATCH
        limit = self._limits[watch]
        if limit and self._held[watch] >= limit:
            if self._on_done is not None:
                report(self._on_done, details.method, grpc.StatusCode.RESOURCE_EXHAUSTED)
            return _refusal(self._message(watch))
        # Interceptors run in the task that serves the call, which ends when the call does,
        # also when the client goes away before its message arrived.
        task = asyncio.current_task()
        if task is None:  # not inside grpc.aio's call task: nothing to count on
            return handler
        self._held[watch] += 1
        task.add_done_callback(lambda _: self._release(watch))
        if not watch and limit and self._held[watch] >= limit:
            self._set_full(True)
        return handler

    def _release(self, watch: bool) -> None:
        self._held[watch] -= 1
        if not watch and self._full and self._held[watch] <= self._resume:
            self._set_full(False)

    def _set_full(self, full: bool) -> None:
        self._full = full
        if self._on_full is not None:
            self._on_full(full)

    def _message(self, watch: bool) -> str:
        if watch:
            return (f"the server holds {self._limits[True]} health Watch streams, its limit "
                    "(--max-watch-streams): retry later, or poll with Check")
        return (f"the server holds {self._limits[False]} calls, its limit "
                "(--max-concurrent-rpcs): retry later")


def _refusal(message: str) -> Handler:
    """A handler that ends the call RESOURCE_EXHAUSTED: served as a stream, so that gRPC
    hands it the call before reading (and buffering) the request message."""
    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    return grpc.stream_stream_rpc_method_handler(refuse)
