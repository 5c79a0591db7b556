"""CallLimits on a real in-process grpc.aio server: calls and health Watch streams are
capped apart, refusals are reported, and a call's slot comes back however it ended (the
e2e tests in tests/e2e/test_connections.py show the same against `tapserve serve`)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.health import SERVING, Health
from service.protocol.call_limits import CallLimits

HOLD = "/t.S/Hold"


async def test_calls_and_watch_streams_have_caps_of_their_own() -> None:
    done: list[tuple[str, str]] = []
    full: list[bool] = []
    release = asyncio.Event()
    limits = CallLimits(calls=20, watches=1, on_done=lambda m, c: done.append((m, c)),
                        on_full=full.append)
    server = grpc.aio.server(interceptors=[limits])
    health = Health()
    health.set("", SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)

    async def hold(request: bytes, context: object) -> bytes:
        await release.wait()
        return request

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.S", {"Hold": grpc.unary_unary_rpc_method_handler(hold)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            second = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert await second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-watch-streams" in await second.details()

            held = [channel.unary_unary(HOLD)(b"%d" % i) for i in range(20)]
            while not limits.full:  # the Watch stream took none of these slots
                await asyncio.sleep(0.01)
            assert full == [True]
            with_deadline = channel.unary_unary(HOLD)(b"x", timeout=10)
            assert await with_deadline.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (HOLD, "RESOURCE_EXHAUSTED") in done
            # At the cap, a Watch still has its own slots: this one is back once the first
            # Watch ends.
            watch.cancel()
            for _ in range(100):
                third = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                try:
                    assert (await asyncio.wait_for(third.read(), 5)).status == SERVING
                    break
                except grpc.aio.AioRpcError as error:  # the first one's slot is not back yet
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("the cancelled Watch stream's slot never came back")
            # Cancelled calls give their slots back: one is not enough to leave "full" (a
            # tenth of the 20 slots must be free), two are.
            held[0].cancel()
            await asyncio.sleep(0.2)
            assert limits.full and full == [True]
            held[1].cancel()
            while limits.full:
                await asyncio.sleep(0.01)
            assert full == [True, False]
            release.set()
            assert [await call for call in held[2:]] == [b"%d" % i for i in range(2, 20)]
            assert await channel.unary_unary(HOLD)(b"y", timeout=10) == b"y"
            third.cancel()
    finally:
        await server.stop(0)
