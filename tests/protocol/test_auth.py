"""Bearer tokens alone: the token file's format and reloads (service/auth.py), and the gRPC
interceptor on a real in-process server, for the call shapes the e2e tests cannot reach
(a streaming method that needs a token: none of Tapserve's own does yet)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from service.auth import Access, Tokens, open_grpc_method
from service.errors import ConfigError, Unauthenticated
from service.protocol.grpc_auth import BearerTokenInterceptor
from service.protocol.status import ErrorStatusInterceptor


def write(path: Path, text: str | bytes) -> None:
    staging = path.with_name("staging")
    staging.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(staging, path)  # a new inode: a change even within one mtime tick


def accepts(tokens: Tokens, header: str | None) -> bool:
    try:
        tokens.check(header)
    except Unauthenticated:
        return False
    return True


def test_token_file_lines_comments_and_header_forms(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    write(path, "# team A\n  alpha  \n\n\t\nbeta\n#gamma\n")
    tokens = Tokens(path)
    assert accepts(tokens, "Bearer alpha") and accepts(tokens, "bearer beta")
    assert accepts(tokens, "  Bearer   alpha ")
    for header in (None, "", "alpha", "Basic alpha", "Bearer", "Bearer gamma",
                   "Bearer #gamma", "Bearer # team A", "Bearer alph", "Bearer alphaa"):
        assert not accepts(tokens, header), header


def test_a_changed_file_replaces_the_tokens_and_a_broken_one_keeps_them(
        tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    write(path, "alpha\n")
    tokens = Tokens(path)
    write(path, "beta\n")
    tokens.refresh()
    assert accepts(tokens, "Bearer beta") and not accepts(tokens, "Bearer alpha")
    write(path, b"caf\xc3\xa9\n")  # not ASCII: refused, the tokens in use stay
    tokens.refresh()
    assert accepts(tokens, "Bearer beta")
    path.unlink()  # a file gone for a moment (a rotation) changes nothing either
    tokens.refresh()
    assert accepts(tokens, "Bearer beta")
    write(path, "# no token\n")  # no token at all: kept too (see the test below)
    tokens.refresh()
    assert accepts(tokens, "Bearer beta")


def test_a_file_rewritten_in_place_is_not_read_while_empty(tmp_path: Path) -> None:
    """Issue 18: a token file rewritten in place (truncated, then written) was read between
    the two, and every call was refused until the next read (44 refusals in ~0.6 s)."""
    path = tmp_path / "tokens"
    path.write_text("alpha\n")
    tokens = Tokens(path)
    with open(path, "w") as file:  # truncated: the rewrite has begun
        file.flush()
        os.utime(path, ns=(0, 0))  # a stamp of its own, whatever the clock's resolution
        tokens.refresh()
        assert accepts(tokens, "Bearer alpha")
        file.write("beta\n")
    tokens.refresh()
    assert accepts(tokens, "Bearer beta") and not accepts(tokens, "Bearer alpha")


def test_an_unusable_token_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the token file"):
        Tokens(tmp_path / "missing")
    write(tmp_path / "tokens", "good\nbad\x07token\n")
    with pytest.raises(ConfigError, match="line 2 .* control character"):
        Tokens(tmp_path / "tokens")


def test_open_methods_are_health_and_reflection_only() -> None:
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                   "/inference.GRPCInferenceService/ServerReady",
                   "/inference.GRPCInferenceService/ModelReady"):
        assert open_grpc_method(method), method
    for method in ("/inference.GRPCInferenceService/ModelInfer",
                   "/inference.GRPCInferenceService/ServerReadyX",
                   "/inference.GRPCInferenceService/ServerMetadata",
                   "/tensorflow.serving.ModelService/GetModelStatus",
                   "/grpc.health.v1.HealthX/Check", "/other.Service/Method"):
        assert not open_grpc_method(method), method


async def test_every_call_shape_is_refused_without_a_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    write(path, "alpha\n")
    refused = []
    server = grpc.aio.server(interceptors=[
        ErrorStatusInterceptor(),
        BearerTokenInterceptor(Access(Tokens(path), None), lambda m, r, e: refused.append((m, r)))])

    async def unary(request: bytes, context: object) -> bytes:
        return b"u:" + request

    async def stream(request: bytes, context: object):
        yield b"s1"
        yield b"s2"

    async def client_stream(requests, context: object) -> bytes:
        return b"".join([r async for r in requests])

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Gather": grpc.stream_unary_rpc_method_handler(client_stream),
        "Chat": grpc.stream_stream_rpc_method_handler(stream),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            good = (("authorization", "Bearer alpha"),)
            calls = {
                "Unary": lambda md: channel.unary_unary("/t.S/Unary")(b"x", metadata=md),
                "Stream": lambda md: _collect(channel.unary_stream("/t.S/Stream")(
                    b"x", metadata=md)),
                "Gather": lambda md: channel.stream_unary("/t.S/Gather")(
                    iter([b"a", b"b"]), metadata=md),
                "Chat": lambda md: _collect(channel.stream_stream("/t.S/Chat")(
                    iter([b"a"]), metadata=md)),
            }
            answers = {"Unary": b"u:x", "Stream": [b"s1", b"s2"], "Gather": b"ab",
                       "Chat": [b"s1", b"s2"]}
            for name, call in calls.items():
                assert await call(good) == answers[name], name
                for metadata in ((), (("authorization", "Bearer beta"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(metadata)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                    assert "bearer token" in info.value.details()
    finally:
        await server.stop(0)
    # The unary refusals reached the hook with the parsed request; no handler ran.
    assert refused == [("/t.S/Unary", b"x")] * 2


async def _collect(call) -> list[bytes]:
    return [message async for message in call]
