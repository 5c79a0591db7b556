"""The KServe v2 / Open Inference Protocol servicer: convert, call the data plane, convert back.

Domain errors propagate; service.protocol.status maps them to gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from service.errors import SHUTTING_DOWN
from service.protocol import convert
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.protocol.generated.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceServicer
from service.protocol.status import INTERNAL_MESSAGE, Undecodable, status_code
from service.protocol.streams import answered_concurrently
from service.tracing import NO_TRACE, NO_TRACING, RequestTrace, Tracing
from service.types import DataPlane

T = TypeVar("T")
log = logging.getLogger(__name__)
PROTOCOL = "kserve_grpc"
# A servicer method's context (its request and response types are the method's own).
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class InferenceServicer(GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService for a grpc.aio server."""

    def __init__(self, dataplane: DataPlane, stream_in_flight: int = 100,
                 tracing: Tracing = NO_TRACING) -> None:
        self._dataplane = dataplane
        self._stream_in_flight = stream_in_flight
        self._tracing = tracing

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        model, endpoint = convert.parse_model_name(request.name)
        version = convert.parse_version(request.version)
        return pb.ModelReadyResponse(ready=self._dataplane.model_ready(model, endpoint, version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        name, version, extensions = self._dataplane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        model, endpoint = convert.parse_model_name(request.name)
        version = convert.parse_version(request.version)
        meta = self._dataplane.model_metadata(model, endpoint, version)
        return convert.encode_model_metadata(meta, request.name)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        with self._tracing.request(PROTOCOL, request.model_name, context) as trace:
            return await self._infer(request, deadline_of(context), trace)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Every request read runs at once (so one stream's requests batch together) and is
        # answered when done, in any order; errors are per request and the stream goes on.
        deadline = deadline_of(context)

        async def answer(request: pb.ModelInferRequest | Undecodable
                         ) -> pb.ModelStreamInferResponse:
            return await self._stream_answer(request, deadline, context)

        async for response in answered_concurrently(requests, answer, self._stream_in_flight,
                                                    self._dataplane.until_draining):
            yield response
        if self._dataplane.draining:  # what was read is answered: say why it ends
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def _infer(self, request: pb.ModelInferRequest | Undecodable, deadline: float | None,
                     trace: RequestTrace = NO_TRACE) -> pb.ModelInferResponse:
        """One ModelInfer, unary or streamed; raises TapserveError (counted and logged)."""
        if isinstance(request, Undecodable):  # a streamed message that does not parse
            self._dataplane.refused(PROTOCOL, "", None, request.error)
            raise request.error
        with self._dataplane.call(PROTOCOL, request.model_name, None, request.id) as call:
            # The endpoint first: its inputs are checked before any tensor is decoded.
            target = call.resolve(*convert.infer_target(request))
            infer_request = await decoded(
                convert.decode_infer_request, request, deadline, target.inputs,
                target.max_rows,
                elements=convert.declared_elements(t.shape for t in request.inputs))
            response = await call.infer(infer_request)
            trace.answered(response)
            # Inside the call: its encoding counts in its latency and stages.
            return convert.encode_infer_response(response, request.model_name)

    async def _stream_answer(self, request: pb.ModelInferRequest | Undecodable,
                             deadline: float | None, context: Context
                             ) -> pb.ModelStreamInferResponse:
        """The stream's answer to one request: its response, or the message the unary call
        would have failed with, under the request's id and model (as Triton answers)."""
        try:
            name = request.model_name if isinstance(request, pb.ModelInferRequest) else ""
            with self._tracing.request(PROTOCOL, name, context) as trace:
                response = await self._infer(request, deadline, trace)
            return pb.ModelStreamInferResponse(infer_response=response)
        except Exception as exc:
            if status_code(exc) is None:  # the server's fault: the details stay in the log
                log.exception("unhandled error in ModelStreamInfer")
                message = INTERNAL_MESSAGE
            else:
                message = str(exc)
        if isinstance(request, Undecodable):
            return pb.ModelStreamInferResponse(error_message=message)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=(
            pb.ModelInferResponse(model_name=request.model_name,
                                  model_version=request.model_version, id=request.id)))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        model = convert.parse_model_name(request.name)[0] if request.name else ""
        versions = self._dataplane.model_statistics(model,
                                                    convert.parse_version(request.version))
        return json_format.ParseDict(convert.statistics_document(versions),
                                     pb.ModelStatisticsResponse())

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        entries = self._dataplane.repository_index(request.ready)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r)
            for n, v, s, r in entries])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        convert.check_repository_request(request)
        await self._dataplane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        convert.check_repository_request(request)
        await self._dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def deadline_of(context: Context) -> float | None:
    """The client's deadline on the time.monotonic() clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def decoded(decode: Callable[..., T], msg: Message, *args: object,
                  elements: int) -> T:
    """decode(msg, *args), on the event loop for a small message, on a thread for a
    large one: splitting millions of BYTES elements must not stall every other RPC.
    `elements`, what the message's shapes declare, says which (the decoders check it
    against the data): msg.ByteSize() serializes the message to count, 0.2-0.6 s of
    the event loop for 60 MiB."""
    if elements <= convert.DECODE_INLINE_ELEMENTS:
        return decode(msg, *args)
    return await asyncio.to_thread(decode, msg, *args)
