"""grpc.health.v1 for grpc.aio: Check, Watch, and the statuses the server sets.

Written here rather than taken from grpcio-health-checking, whose aio servicer forgets a
service's watchers as soon as any one of its Watch streams ends (the others then never
hear a change again, NOT_SERVING at drain included), and holds a per-service lock while it
writes to a watcher, so one client that never reads blocks every later status change.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
WATCH = "/grpc.health.v1.Health/Watch"


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        # Each Watch stream's wake-up event, by the service it watches, kept while anyone
        # watches it (a client may name any service). Setting a status only sets events and
        # never waits on a client: a Watch whose client reads nothing holds up itself alone.
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._shutting_down = False

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> health_pb2.HealthCheckResponse:
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> None:
        service = request.service
        changed = asyncio.Event()
        self._watchers.setdefault(service, set()).add(changed)
        last = None
        try:
            while True:
                changed.clear()
                status = self._status.get(service, SERVICE_UNKNOWN)
                if status == last:
                    await changed.wait()
                    continue
                # Statuses set while this write waits on the client collapse into the
                # latest, sent next.
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
        finally:
            watchers = self._watchers[service]
            watchers.discard(changed)
            if not watchers:
                del self._watchers[service]

    def set(self, service: str, status: int) -> None:
        """Set a service's status; ignored once the server is shutting down."""
        if not self._shutting_down:
            self._set(service, status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        if not self._shutting_down:
            self._shutting_down = True
            for service in list(self._status):
                self._set(service, NOT_SERVING)

    def _set(self, service: str, status: int) -> None:
        self._status[service] = status
        for changed in self._watchers.get(service, ()):
            changed.set()
