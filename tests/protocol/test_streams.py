"""service.protocol.streams alone: concurrency, order, the in-flight bound, stop and cancel.
Deterministic: answers wait on events the test sets, never on sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.protocol.streams import answered_concurrently


class Source:
    """An async request stream the test feeds, counting what was read."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.read = 0

    def __aiter__(self) -> AsyncIterator[int]:
        return self

    async def __anext__(self) -> int:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        self.read += 1
        return item


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_answers_come_as_each_is_ready_not_in_order() -> None:
    async def main() -> list[int]:
        gates = {i: asyncio.Event() for i in range(3)}
        source = Source()

        async def answer(i: int) -> int:
            await gates[i].wait()
            return i * 10

        for i in (0, 1, 2, None):
            source.queue.put_nowait(i)
        out = answered_concurrently(source, answer, limit=8)
        got = []
        for i in (2, 0, 1):
            gates[i].set()
            got.append(await anext(out))
        with pytest.raises(StopAsyncIteration):
            await anext(out)
        return got

    assert run(main()) == [20, 0, 10]


def test_all_requests_run_at_once() -> None:
    async def main() -> int:
        running = 0
        peak = 0
        release = asyncio.Event()
        source = Source()

        async def answer(i: int) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            return i

        for i in [*range(5), None]:
            source.queue.put_nowait(i)
        out = answered_concurrently(source, answer, limit=8)
        first = asyncio.ensure_future(anext(out))
        await settle()
        release.set()
        results = [await first] + [r async for r in out]
        assert sorted(results) == list(range(5))
        return peak

    assert run(main()) == 5


def test_a_full_stream_is_not_read_until_an_answer_is_taken() -> None:
    async def main() -> None:
        source = Source()
        for i in range(10):
            source.queue.put_nowait(i)

        async def answer(i: int) -> int:
            return i

        out = answered_concurrently(source, answer, limit=3)
        first = await anext(out)  # the consumer holds this answer: its slot is still taken
        await settle()
        assert source.read == 3, "read past the bound while 3 were unanswered"
        await anext(out)  # the first answer is taken: one more may be read
        await settle()
        assert source.read == 4
        assert first == 0
        await out.aclose()

    run(main())


def test_stop_answers_what_was_read_and_reads_no_more() -> None:
    async def main() -> None:
        source = Source()
        stop = asyncio.Event()
        gate = asyncio.Event()
        source.queue.put_nowait(1)
        source.queue.put_nowait(2)

        async def answer(i: int) -> int:
            await gate.wait()
            return i

        async def stopped() -> None:
            await stop.wait()

        out = answered_concurrently(source, answer, limit=8, stop=stopped)
        pending = asyncio.ensure_future(anext(out))
        await settle()
        assert source.read == 2
        stop.set()
        await settle()
        source.queue.put_nowait(3)  # arrives after the stop: never read
        gate.set()
        got = [await pending] + [r async for r in out]
        assert sorted(got) == [1, 2]
        assert source.read == 2

    run(main())


def test_closing_the_stream_cancels_unanswered_requests() -> None:
    async def main() -> None:
        source = Source()
        cancelled = []
        never = asyncio.Event()

        async def answer(i: int) -> int:
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.append(i)
                raise
            return i

        for i in range(4):
            source.queue.put_nowait(i)
        consumer = asyncio.ensure_future(anext(answered_concurrently(source, answer, 8)))
        await settle()
        consumer.cancel()  # as gRPC cancels the handler when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert sorted(cancelled) == [0, 1, 2, 3]
        # Nothing of the stream is left running.
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main())


def test_an_error_escaping_answer_ends_the_stream_with_it() -> None:
    async def main() -> None:
        source = Source()
        source.queue.put_nowait(1)

        async def answer(i: int) -> int:
            raise ValueError("bug")

        with pytest.raises(ValueError, match="bug"):
            async for _ in answered_concurrently(source, answer, 8):
                pass

    run(main())
