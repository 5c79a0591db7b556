"""grpc.health.v1 for grpc.aio: Check, Watch, and the statuses the server sets.

Written here rather than taken from grpcio-health-checking, whose aio servicer forgets a
service's watchers as soon as any one of its Watch streams ends: the others then never
hear a change again, NOT_SERVING at drain included (a load balancer watching keeps
sending to a pod that is going away).
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        # One condition per watched service, kept while anyone watches it: a client may
        # name any service, so nothing stays once its last watcher leaves.
        self._watched: dict[str, tuple[asyncio.Condition, int]] = {}
        self._shutting_down = False

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        service = request.service
        condition, watchers = self._watched.get(service, (asyncio.Condition(), 0))
        self._watched[service] = (condition, watchers + 1)
        last = None
        try:
            async with condition:
                while True:
                    status = self._status.get(service, SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    await condition.wait()
        finally:
            condition, watchers = self._watched[service]
            if watchers > 1:
                self._watched[service] = (condition, watchers - 1)
            else:
                del self._watched[service]

    async def set(self, service: str, status: int) -> None:
        """Set a service's status; ignored once the server is shutting down."""
        if not self._shutting_down:
            await self._set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        if not self._shutting_down:
            self._shutting_down = True
            for service in list(self._status):
                await self._set(service, NOT_SERVING)

    async def _set(self, service: str, status: int) -> None:
        self._status[service] = status
        if service in self._watched:
            condition, _ = self._watched[service]
            async with condition:
                condition.notify_all()
