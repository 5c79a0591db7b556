"""A time limit on receiving a unary call's request message.

gRPC core buffers a message until its last byte arrives, and grows the stream's
flow-control window to the size the message's prefix announces: a client that sends part
of a large message and stalls holds that memory, and a slot of --max-concurrent-rpcs,
for as long as the connection lives. grpc.aio reads a unary request before any handler
or interceptor code runs, so the limit needs the call served as client-streaming (the
same bytes on the wire): the handler then reads the one message itself, with a timeout,
and ending the call frees what core buffered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.protocol.status import Context, Handler, HandlerInterceptor, OnDone, report

Behavior = Callable[[Any, Context], Awaitable[Any]]


class RequestReadTimeout(HandlerInterceptor):
    """Unary calls whose request message has not fully arrived within `seconds` end with
    DEADLINE_EXCEEDED. Install it first (outermost): the handlers it wraps must be the
    coroutines ErrorStatusInterceptor makes."""

    def __init__(self, seconds: float, on_done: OnDone | None = None) -> None:
        super().__init__()
        self._seconds = seconds
        self._on_done = on_done

    def wrap(self, handler: Handler, method: str) -> Handler:
        # HandlerInterceptor wraps only unary-unary handlers here (streams is False), and
        # grpc's stubs type their behaviour for the sync server: grpc.aio's is a coroutine
        # taking an aio context.
        return grpc.stream_unary_rpc_method_handler(
            self._reading(handler.unary_unary, method),  # type: ignore[arg-type]  # see above
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _reading(self, behavior: Behavior, method: str) -> Callable[..., Awaitable[Any]]:
        async def read_then_call(requests: AsyncIterator[Any],
                                 context: Context) -> Any:
            try:
                async with asyncio.timeout(self._seconds):  # no task: one timer per call
                    request = await anext(requests, None)
            except TimeoutError:
                if self._on_done is not None:
                    report(self._on_done, method, grpc.StatusCode.DEADLINE_EXCEEDED)
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request message did not arrive within {self._seconds:g} s "
                    "(--grpc-request-read-timeout-secs)")
            if request is None:  # the client ended the call without a message
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
            return await behavior(request, context)

        return read_then_call
