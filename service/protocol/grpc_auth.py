"""The gRPC interceptor that asks for a bearer token before any handler runs.

Every method needs one except health and reflection (service.auth.open_grpc_method):
new methods are closed by default. The repository API needs an admin token when
--admin-token-file is set (service.auth.Access). A refused call never reaches its handler; its
Unauthenticated error is raised inside the handler slot, so ErrorStatusInterceptor (the
outer interceptor) answers UNAUTHENTICATED and counts it like any other status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from service.auth import REPOSITORY_GRPC_METHODS, Access, open_grpc_method
from service.errors import Unauthenticated

# Called with (full method name, deserialized request, error) for each refused unary call:
# the server counts refused inference requests under their model.
OnRefused = Callable[[str, Any, Unauthenticated], None]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, access: Access, on_refused: OnRefused | None = None) -> None:
        self._access = access
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or open_grpc_method(details.method):
            return handler
        tokens = self._access.needed(details.method in REPOSITORY_GRPC_METHODS)
        if tokens is None:
            return handler
        authorization = next((value for key, value in details.invocation_metadata or ()
                              if key == "authorization" and isinstance(value, str)), None)
        try:
            tokens.check(authorization)
        except Unauthenticated as error:
            return self._refusal(handler, details.method, error)
        return handler

    def _refusal(self, handler: Handler, method: str, error: Unauthenticated) -> Handler:
        serializers = {"request_deserializer": handler.request_deserializer,
                       "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if self._on_refused is not None:
                    self._on_refused(method, request, error)
                raise error

            return grpc.unary_unary_rpc_method_handler(refuse, **serializers)

        async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(abort, **serializers)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(abort, **serializers)
        return grpc.stream_stream_rpc_method_handler(abort, **serializers)
