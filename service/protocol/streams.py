"""Answer a stream of requests concurrently: a task per request, each answer yielded as soon
as it is ready, at most `limit` requests read and not yet answered.

Protocol-free (no gRPC here): tested alone in tests/protocol/test_streams.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar, cast

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Queue sentinels: the reader has read its last request (or failed); stop reading (drain).
_END = object()
_STOP = object()


async def answered_concurrently(
    requests: AsyncIterator[Req], answer: Callable[[Req], Awaitable[Resp]], limit: int,
    stop: Callable[[], Awaitable[object]] | None = None,
) -> AsyncIterator[Resp]:
    """Yield answer(request) for every request, in the order the answers complete.

    `answer` should turn a request's failure into an answer: an exception it raises ends
    the whole stream. While `limit` requests are unanswered (an answer counts until the
    consumer took it and asked for the next), the next request is not read, so the peer
    is held back by flow control instead of filling memory. Once `stop()` returns, no
    further request is read; the ones read are answered, then the iterator ends. Closing
    the iterator early (the peer went away) cancels every unanswered request.
    """
    slots = asyncio.Semaphore(limit)
    ready: asyncio.Queue[object] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    unanswered = 0

    async def one(request: Req) -> None:
        try:
            ready.put_nowait(await answer(request))
        except Exception as exc:  # handed to the consumer, which raises it
            ready.put_nowait(exc)

    async def read() -> None:
        nonlocal unanswered
        try:
            while True:
                await slots.acquire()  # before reading: a full stream is not read
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                unanswered += 1
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            ready.put_nowait(_END)

    async def watch(until: Callable[[], Awaitable[object]]) -> None:
        await until()
        ready.put_nowait(_STOP)

    reader = asyncio.create_task(read())
    watcher = asyncio.create_task(watch(stop)) if stop is not None else None
    reading = True
    try:
        while reading or unanswered:
            item = await ready.get()
            if item is _END or item is _STOP:
                if reading and item is _END and reader.done() and not reader.cancelled():
                    reader.result()  # the request stream itself failed: end with its error
                reading = False
                reader.cancel()
                continue
            unanswered -= 1
            if isinstance(item, Exception):
                raise item
            yield cast(Resp, item)  # the queue holds answers, exceptions and the sentinels
            slots.release()
    finally:
        for task in (reader, watcher, *tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(reader, *(t for t in (watcher,) if t), *tasks,
                             return_exceptions=True)
