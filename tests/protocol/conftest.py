"""Shared test helpers: a real grpc.aio server in a background thread, and the stock
tritonclient run in a subprocess (see stock_client.py for why)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.protocol.status import ErrorStatusInterceptor, OnDone

ROOT = Path(__file__).resolve().parents[2]
STOCK_CLIENT = Path(__file__).resolve().parent / "stock_client.py"

StockClient = Callable[..., list[dict[str, Any]]]


def run_stock_client(plan: list[dict[str, Any]], url: str | None = None) -> list[dict[str, Any]]:
    """Run `plan` through stock_client.py and return its results, one per call."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(STOCK_CLIENT), *([url] if url else [])]
    done = subprocess.run(
        args, input=json.dumps(plan), capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def stock_client() -> StockClient:
    return run_stock_client


@contextmanager
def serve_in_thread(
    register: Callable[[grpc.aio.Server], None], on_done: OnDone | None = None
) -> Iterator[int]:
    """A grpc.aio server with the error interceptor on 127.0.0.1, on its own loop and thread.

    `register` adds the servicers; yields the port. A thread keeps sync test code (and its
    blocking subprocess calls) from stalling the server.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-test-server", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=[ErrorStatusInterceptor(on_done)])
        register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture(scope="session")
def serve() -> Callable[[Callable[[grpc.aio.Server], None]], Any]:
    """serve_in_thread, for test modules (they do not import conftest)."""
    return serve_in_thread
