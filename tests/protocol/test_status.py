"""ErrorStatusInterceptor on any service: a tiny bytes-in/bytes-out service on a real server."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from service.errors import (
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
)
from service.protocol.status import status_code


class ModelNotFound(NotFound):
    """A subclass a core might define: it keeps its parent's status."""


async def _abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own status")
    return b""


async def _raise_subclass(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ModelNotFound("no model 'x'")


async def _raise_not_ready(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise NotReady("draining")


async def _raise_config_error(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ConfigError("/secret/path/config.yaml is broken")


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _sync_raise(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(0.01)  # runs off the event loop
    raise Overloaded("queue full")


def _sync_echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> Any:
    for i in range(3):
        yield bytes([i])


async def _stream_raise(request: bytes, context: grpc.aio.ServicerContext) -> Any:
    yield b"\x00"
    raise ModelNotFound("x")


async def _stream_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
    for i in range(3):  # the other streaming style: writes, returns nothing
        await context.write(bytes([i]))


def _parse(data: bytes) -> bytes:
    """A request deserializer: b"bad" does not parse, as bytes that are no protobuf."""
    if data == b"bad":
        raise ValueError("Error parsing message")
    return data


async def _count_messages(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    async for request in requests:
        yield request


HANDLERS = {
    "Abort": grpc.unary_unary_rpc_method_handler(_abort),
    "Subclass": grpc.unary_unary_rpc_method_handler(_raise_subclass),
    "NotReady": grpc.unary_unary_rpc_method_handler(_raise_not_ready),
    "Unmapped": grpc.unary_unary_rpc_method_handler(_raise_config_error),
    "Echo": grpc.unary_unary_rpc_method_handler(_echo),
    "SyncRaise": grpc.unary_unary_rpc_method_handler(_sync_raise),
    "SyncEcho": grpc.unary_unary_rpc_method_handler(_sync_echo),
    "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    "StreamRaise": grpc.unary_stream_rpc_method_handler(_stream_raise),
    "StreamWrite": grpc.unary_stream_rpc_method_handler(_stream_write),
    "Parsed": grpc.unary_unary_rpc_method_handler(_echo, request_deserializer=_parse),
    "ParsedStream": grpc.stream_stream_rpc_method_handler(_count_messages,
                                                          request_deserializer=_parse),
}


# (method, code) pairs the interceptor reports through its on_done hook. context.abort sends
# the status before the hook runs, so a test waits for reported rather than racing it.
reports: list[tuple[str, str]] = []
reported = threading.Event()


def _record(method: str, code: str) -> None:
    reports.append((method, code))
    reported.set()


@pytest.fixture(scope="module")
def channel(serve: Callable[..., Any]) -> Iterator[grpc.Channel]:
    handler = grpc.method_handlers_generic_handler("test.Probe", HANDLERS)
    with (
        serve(lambda server: server.add_generic_rpc_handlers((handler,)),
              _record) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield channel


def _call(channel: grpc.Channel, method: str, payload: bytes = b"hi") -> bytes:
    return channel.unary_unary(f"/test.Probe/{method}")(payload, timeout=10)


def _status(channel: grpc.Channel, method: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, method)
    return info.value.code(), info.value.details()


def test_handler_abort_propagates_unchanged(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="service.protocol.status"):
        status = _status(channel, "Abort")
    assert status == (grpc.StatusCode.PERMISSION_DENIED, "handler's own status")
    # grpc's AbortError is not an unhandled error: nothing logged, no second abort.
    assert not [r for r in caplog.records if r.name == "service.protocol.status"]


def test_subclass_keeps_parent_status(channel: grpc.Channel) -> None:
    assert _status(channel, "Subclass") == (grpc.StatusCode.NOT_FOUND, "no model 'x'")


def test_any_service_is_covered(channel: grpc.Channel) -> None:
    assert _status(channel, "NotReady") == (grpc.StatusCode.UNAVAILABLE, "draining")


def test_unmapped_domain_error_is_generic_internal(channel: grpc.Channel) -> None:
    assert _status(channel, "Unmapped") == (grpc.StatusCode.INTERNAL, "internal server error")


def test_sync_handlers_are_mapped_too(channel: grpc.Channel) -> None:
    assert _status(channel, "SyncRaise") == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert _call(channel, "SyncEcho") == b"hi"


def test_success_and_streams_pass_through(channel: grpc.Channel) -> None:
    assert _call(channel, "Echo", b"payload") == b"payload"
    stream = channel.unary_stream("/test.Probe/Stream")(b"", timeout=10)
    assert list(stream) == [b"\x00", b"\x01", b"\x02"]


def test_status_code_table() -> None:
    assert status_code(ModelNotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code(ConfigError("x")) is None
    assert status_code(ValueError("x")) is None
    table = {NotFound: "NOT_FOUND", InvalidInput: "INVALID_ARGUMENT",
             Overloaded: "RESOURCE_EXHAUSTED", NotReady: "UNAVAILABLE",
             DeadlineExceeded: "DEADLINE_EXCEEDED", Cancelled: "CANCELLED"}
    for error, code in table.items():
        assert status_code(error("x")) == grpc.StatusCode[code], error


@pytest.mark.parametrize(("method", "code"), [
    ("Echo", "OK"), ("SyncEcho", "OK"), ("Subclass", "NOT_FOUND"), ("Abort", "PERMISSION_DENIED"),
    ("SyncRaise", "RESOURCE_EXHAUSTED"), ("Unmapped", "INTERNAL"),
])
def test_on_done_reports_each_call_once(channel: grpc.Channel, method: str, code: str) -> None:
    reports.clear()
    reported.clear()
    with contextlib.suppress(grpc.RpcError):
        _call(channel, method)
    assert reported.wait(timeout=10)
    assert reports == [(f"/test.Probe/{method}", code)]


@pytest.mark.parametrize("method", ["Stream", "StreamWrite"])
def test_on_done_reports_a_stream_once_when_it_ends(channel: grpc.Channel, method: str) -> None:
    reports.clear()
    reported.clear()
    assert list(channel.unary_stream(f"/test.Probe/{method}")(b"", timeout=10)) == [
        b"\x00", b"\x01", b"\x02"]
    assert reported.wait(timeout=10)
    assert reports == [(f"/test.Probe/{method}", "OK")]


def test_a_stream_that_raises_ends_with_the_mapped_status(channel: grpc.Channel) -> None:
    reports.clear()
    reported.clear()
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for item in channel.unary_stream("/test.Probe/StreamRaise")(b"", timeout=10):
            got.append(item)
    assert got == [b"\x00"]  # what came before the error still arrived
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.NOT_FOUND, "x")
    assert reported.wait(timeout=10)
    assert reports == [("/test.Probe/StreamRaise", "NOT_FOUND")]


def test_a_request_that_does_not_parse_is_invalid_argument_not_unknown(
        channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    # Regression: grpc.aio answered a deserializer's error UNKNOWN, with an ERROR traceback
    # (grpc's own logger), and the interceptor never saw the call to count it.
    reports.clear()
    reported.clear()
    with caplog.at_level(logging.INFO):
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, "Parsed", b"bad")
        assert reported.wait(timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert info.value.details() == "the request is not a valid Parsed message: ValueError"
    assert reports == [("/test.Probe/Parsed", "INVALID_ARGUMENT")]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert _call(channel, "Parsed", b"good") == b"good"


def test_a_client_stream_message_that_does_not_parse_ends_it_invalid_argument(
        channel: grpc.Channel) -> None:
    # A stream whose handler does not answer undecodable messages itself (reflection):
    # what came before is answered, then the stream ends INVALID_ARGUMENT, not UNKNOWN.
    reports.clear()
    reported.clear()
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for item in channel.stream_stream("/test.Probe/ParsedStream")(
                iter([b"one", b"bad", b"three"]), timeout=10):
            got.append(item)
    assert got == [b"one"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert reported.wait(timeout=10)
    assert reports == [("/test.Probe/ParsedStream", "INVALID_ARGUMENT")]
