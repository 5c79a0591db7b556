"""One grpc.aio interceptor mapping domain errors to gRPC status codes, for every service.

Servicers raise service.errors; this is the only place that knows their gRPC codes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from service.errors import InvalidInput, TapserveError

_log = logging.getLogger(__name__)

# What the client sees for anything unexpected: the traceback stays in the server's log.
INTERNAL_MESSAGE = "internal server error"


def status_code(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC code of a domain error, or None for anything that is the server's fault.

    Domain errors carry their canonical status name (google.rpc.Code), which gRPC's
    StatusCode shares, so this mapping is by name.
    """
    if isinstance(error, TapserveError) and error.code != "INTERNAL":
        return grpc.StatusCode[error.code]
    return None


# Called once per RPC with its full method name and final status code name ("OK",
# "NOT_FOUND", ...), a stream's when it ends: the hook request metrics hang on.
OnDone = Callable[[str, str], None]
# Called with the method and the error when a call's request is bytes that do not parse
# (so inference calls can count under a model too).
OnUndecodable = Callable[[str, InvalidInput], None]


class Undecodable:
    """What a request message that does not parse is handed on as. grpc.aio deserializes
    before any handler or interceptor code runs, and a deserializer that raises ends the
    call UNKNOWN with an ERROR traceback (a stream: the whole stream); this marker lets
    the handler's wrapper refuse it as the client's error instead."""

    def __init__(self, error: InvalidInput) -> None:
        self.error = error


def tolerant(deserializer: Callable[[bytes], Any] | None, method: str
             ) -> Callable[[bytes], Any] | None:
    """`deserializer`, answering bytes it cannot parse with an Undecodable."""
    if deserializer is None:
        return None
    kind = method.rsplit("/", 1)[-1]

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError; anything a parser raises is the bytes' fault
            return Undecodable(InvalidInput(f"the request is not a valid {kind} message: "
                                            f"{type(exc).__name__}"))

    return deserialize


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps every unary-unary handler (`wrap`), and every streaming
    one too if `streams`, once per method: gRPC hands the same handler for a method on
    every call, and wrapping it anew cost every request a few µs. A method whose handler
    changes (e.g. a per-call refusal) is wrapped again, so at most one entry per method
    is kept."""

    streams = False

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or (handler.unary_unary is None and not self.streams):
            return handler
        method = handler_call_details.method
        cached = self._by_method.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._by_method[method] = (handler, self.wrap(handler, method))
        return cached[1]

    def wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError


class ErrorStatusInterceptor(HandlerInterceptor):
    """Turns exceptions escaping handlers into gRPC status codes and messages, and reports
    every call's final code (`on_done`): unary calls, streams (ModelStreamInfer, health
    Watch, reflection) when they end."""

    streams = True

    def __init__(self, on_done: OnDone | None = None,
                 on_undecodable: OnUndecodable | None = None,
                 answers_undecodable: frozenset[str] = frozenset()) -> None:
        """`answers_undecodable`: streaming methods whose handler answers an Undecodable
        request itself (ModelStreamInfer fails that one request); any other call with
        one ends INVALID_ARGUMENT."""
        super().__init__()
        self._on_done = on_done
        self._on_undecodable = on_undecodable
        self._answers_undecodable = answers_undecodable

    def wrap(self, handler: Handler, method: str) -> Handler:
        serializers = {
            "request_deserializer": tolerant(handler.request_deserializer, method),
            "response_serializer": handler.response_serializer}
        streamed = handler.stream_unary is not None or handler.stream_stream is not None
        refuse = (None if method in self._answers_undecodable
                  else self._refusing(method, streamed))
        # grpc's stubs type a handler's behaviours for the sync server (a
        # grpc.ServicerContext); grpc.aio calls them with its own context: hence the ignores.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_mapping_errors(
                handler.unary_unary,  # type: ignore[arg-type]  # aio context, see above
                method, self._on_done, refuse), **serializers)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_mapping_errors(
                handler.stream_unary,  # type: ignore[arg-type]  # aio context, see above
                method, self._on_done, refuse), **serializers)
        behavior = handler.unary_stream or handler.stream_stream
        wrapped: Callable[[Any, Context], object]
        if inspect.isasyncgenfunction(behavior):  # yields its responses
            wrapped = _mapping_stream_errors(behavior, method, self._on_done, refuse)
        elif inspect.iscoroutinefunction(behavior):  # writes them with context.write
            wrapped = _mapping_errors(behavior, method, self._on_done, refuse)
        else:  # a sync generator: gRPC runs it on a thread of its own; left as it is
            return handler
        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler)
        return make(wrapped, **serializers)

    def _refusing(self, method: str, streamed: bool) -> Refuse:
        """What a call's request goes through: an Undecodable message raises its error
        (for a client-streaming call, when the handler reaches it)."""
        def refuse(request: Any) -> Any:
            if isinstance(request, Undecodable):
                if self._on_undecodable is not None:
                    self._on_undecodable(method, request.error)
                raise request.error
            return request

        async def refuse_each(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                yield refuse(request)

        return refuse_each if streamed else refuse


# The request (or a client stream's messages) as the handler gets it.
Refuse = Callable[[Any], Any]


def _checked(request: Any, refuse: Refuse | None) -> Any:
    return request if refuse is None else refuse(request)


def _mapping_errors(
    behavior: Callable[[Any, Context], Any],
    method: str,
    on_done: OnDone | None,
    refuse: Refuse | None = None,
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def wrapper(request: Any, context: Context) -> Any:
        async with _Outcome(context, method, on_done):
            request = _checked(request, refuse)
            if inspect.iscoroutinefunction(behavior):
                return await behavior(request, context)
            # A sync handler (e.g. a sync health servicer) must not block the event loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, behavior, request, context)

    return wrapper


def _mapping_stream_errors(
    behavior: Callable[[Any, Context], AsyncIterator[Any]],
    method: str,
    on_done: OnDone | None,
    refuse: Refuse | None = None,
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    """_mapping_errors for a handler that yields its responses."""
    async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
        async with _Outcome(context, method, on_done):
            async for response in behavior(_checked(request, refuse), context):
                yield response

    return wrapper


class _Outcome:
    """Around one call's handler: ends the call with the status of what escapes it, and
    reports the call's final code (`on_done`) however it ended."""

    def __init__(self, context: Context, method: str,
                 on_done: OnDone | None) -> None:
        self._context, self._method, self._on_done = context, method, on_done
        self._code = grpc.StatusCode.UNKNOWN

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: object) -> None:
        try:
            if kind is None:
                self._code = self._context.code() or grpc.StatusCode.OK  # the handler may set one
            elif issubclass(kind, grpc.aio.AbortError):
                # The handler already chose its status via context.abort.
                self._code = self._context.code() or self._code
            elif issubclass(kind, asyncio.CancelledError):
                self._code = grpc.StatusCode.CANCELLED  # the client went away
            elif isinstance(error, Exception):
                self._code, message = _status_of(error, self._method)
                await self._context.abort(self._code, message)  # raises AbortError
        finally:
            if self._on_done is not None:
                report(self._on_done, self._method, self._code)


def _status_of(error: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """A domain error's status and message, for the client; anything else is INTERNAL,
    its details left in the log."""
    mapped = status_code(error)
    if mapped is not None:
        return mapped, str(error)
    _log.error("unhandled error in %s", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def report(on_done: OnDone, method: str, code: grpc.StatusCode) -> None:
    # A failing metrics hook must not turn a served request into an error.
    try:
        on_done(method, code.name)
    except Exception:
        _log.exception("on_done hook failed for %s", method)
