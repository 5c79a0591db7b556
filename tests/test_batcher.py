"""The batcher alone (service/batcher.py): no server, no TensorFlow, a fake numpy `run`.

Timing is controlled with asyncio.Event gates and huge queue delays wherever possible;
`asyncio.wait_for(..., SAFETY)` only keeps a broken batcher from hanging the suite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest

from service.batcher import Batcher, BatchPolicy, Timeline, Work, merge, slices, split
from service.errors import Cancelled, DeadlineExceeded, NotReady, Overloaded
from service.types import Batch

Arrays = dict[str, np.ndarray]
SAFETY = 5.0  # seconds: a hang guard, never what a test measures
FOREVER_MS = 60_000.0  # a queue delay no test waits out


def compute(feeds: Arrays, outputs: tuple[str, ...], masks: Arrays | None) -> Arrays:
    x = feeds["x"]
    full = {"y": x * 2, "z": x + 1}
    return {o: full[o] if masks is None else full[o][masks[o]] for o in outputs}


@dataclass
class Call:
    source: Hashable
    outputs: tuple[str, ...]
    feeds: Arrays
    masks: Arrays | None

    @property
    def size(self) -> int:
        return len(self.feeds["x"])


@dataclass
class FakeRun:
    """Computes y = 2x, z = x + 1 honoring row masks; records calls; can block or fail.

    With `gate` set, every call waits for it (and counts how many wait at once).
    """

    gate: asyncio.Event | None = None
    calls: list[Call] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, batch: Batch) -> tuple[Arrays, float, float]:
        feeds = batch.feeds
        self.calls.append(Call(batch.source, batch.outputs,
                               {k: v.copy() for k, v in feeds.items()}, batch.masks))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if np.any(feeds["x"] < 0):
                raise ValueError("negative input")
            return compute(feeds, batch.outputs, batch.masks), 0.0, 0.001
        finally:
            self.running -= 1

    def seen(self) -> np.ndarray:
        """Every input row `run` was given."""
        if not self.calls:
            return np.zeros((0,))
        return np.concatenate([c.feeds["x"].ravel() for c in self.calls])


@asynccontextmanager
async def batcher(run: FakeRun, concurrency: int = 1, **policy: object
                  ) -> AsyncIterator[Batcher]:
    # Most tests pin batch forming to size and delay; the eager rule's tests turn it on.
    policy.setdefault("eager", False)
    b = Batcher(run, BatchPolicy(**policy), concurrency)
    b.start()
    try:
        yield b
    finally:
        if run.gate is not None:
            run.gate.set()
        await asyncio.wait_for(b.close(timeout=0.2), SAFETY)


def xs(*values: float) -> Arrays:
    return {"x": np.array(values, dtype=np.float32)}


async def settle(rounds: int = 20) -> None:
    """Let every ready task run (the batcher's loop included) without waiting on a clock."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def submit(b: Batcher, feeds: Arrays, outputs: tuple[str, ...] = ("y",),
           source: Hashable = "g", deadline: float | None = None) -> asyncio.Task:
    return asyncio.create_task(b.submit(source, feeds, outputs, deadline))


async def result(task: asyncio.Task) -> Arrays:
    out, _ = await asyncio.wait_for(task, SAFETY)
    return out


def _work(feeds: Arrays, outputs: tuple[str, ...], source: Hashable = "g") -> Work:
    return Work(source, feeds, outputs, None, asyncio.get_running_loop().create_future())


def assert_own_answers(requests: list[tuple[np.ndarray, tuple[str, ...]]],
                       outs: list[tuple[Arrays, Timeline]]) -> None:
    """Each request got exactly its outputs, computed on its own rows."""
    for (x, outputs), (out, _) in zip(requests, outs, strict=True):
        assert set(out) == set(outputs)
        want = compute({"x": x}, outputs, None)
        for name in outputs:
            np.testing.assert_array_equal(out[name], want[name])


# --- merge / split / slices --------------------------------------------------------------

async def test_merge_same_outputs_has_no_row_masks() -> None:
    works = [_work(xs(1, 2), ("y", "z")), _work(xs(3), ("y", "z"))]
    batch = merge(works)
    assert batch.masks is None and batch.outputs == ("y", "z") and batch.source == "g"
    np.testing.assert_array_equal(batch.feeds["x"], [1, 2, 3])
    parts = split(works, batch, compute(batch.feeds, batch.outputs, None))
    np.testing.assert_array_equal(parts[0]["y"], [2, 4])
    np.testing.assert_array_equal(parts[0]["z"], [2, 3])
    np.testing.assert_array_equal(parts[1]["y"], [6])
    np.testing.assert_array_equal(parts[1]["z"], [4])


async def test_merge_different_outputs_masks_rows_and_split_gives_each_its_rows() -> None:
    works = [_work(xs(1, 2), ("y",)), _work(xs(3), ("z",)), _work(xs(4, 5), ("y", "z"))]
    batch = merge(works)
    assert batch.outputs == ("y", "z")
    np.testing.assert_array_equal(batch.masks["y"], [True, True, False, True, True])
    np.testing.assert_array_equal(batch.masks["z"], [False, False, True, True, True])
    parts = split(works, batch, compute(batch.feeds, batch.outputs, batch.masks))
    assert [set(p) for p in parts] == [{"y"}, {"z"}, {"y", "z"}]
    np.testing.assert_array_equal(parts[0]["y"], [2, 4])
    np.testing.assert_array_equal(parts[1]["z"], [4])
    np.testing.assert_array_equal(parts[2]["y"], [8, 10])
    np.testing.assert_array_equal(parts[2]["z"], [5, 6])


async def test_split_refuses_a_wrong_row_count() -> None:
    works = [_work(xs(1, 2), ("y",)), _work(xs(3), ("y",))]
    batch = merge(works)
    with pytest.raises(RuntimeError, match="2 rows for output 'y', expected 3"):
        split(works, batch, {"y": np.zeros(2)})
    masked = [_work(xs(1, 2), ("y",)), _work(xs(3), ("z",))]
    batch = merge(masked)
    with pytest.raises(RuntimeError, match="output 'z'"):
        split(masked, batch, {"y": np.zeros(2), "z": np.zeros(2)})
    with pytest.raises(RuntimeError):
        split(works, Batch("g", ("y",), xs(1, 2, 3), None), {"y": np.float32(1)})  # 0-d


def test_slices_cut_into_pieces_of_at_most_size_rows() -> None:
    feeds = {"x": np.arange(7), "w": np.arange(14).reshape(7, 2)}
    pieces = slices(feeds, 3)
    assert [len(p["x"]) for p in pieces] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([p["w"] for p in pieces]), feeds["w"])
    assert len(slices(feeds, 7)) == 1 and len(slices(feeds, 100)) == 1


# --- batch forming -----------------------------------------------------------------------

async def test_a_request_larger_than_max_batch_size_is_split_and_reassembled() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=3, max_queue_delay_ms=1) as b:
        x = np.arange(10, dtype=np.float32)
        out = await result(submit(b, {"x": x}, ("y", "z")))
    np.testing.assert_array_equal(out["y"], x * 2)
    np.testing.assert_array_equal(out["z"], x + 1)
    assert all(c.size <= 3 for c in run.calls)
    assert sum(c.size for c in run.calls) == 10


async def test_a_batch_closes_at_max_batch_size_without_waiting_for_the_delay() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=4, max_queue_delay_ms=FOREVER_MS) as b:
        tasks = [submit(b, xs(i)) for i in range(3)]
        await settle()
        assert run.calls == [] and b.depth == 3  # not full: still waiting
        tasks.append(submit(b, xs(3)))
        outs = [await result(t) for t in tasks]
    assert [c.size for c in run.calls] == [4]
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], [2 * i])


async def test_a_batch_that_is_not_full_closes_after_the_delay() -> None:
    run = FakeRun()
    delay_ms = 50
    async with batcher(run, max_batch_size=8, max_queue_delay_ms=delay_ms) as b:
        task = submit(b, xs(1))
        await settle()
        assert run.calls == []  # did not close early
        out, timeline = await asyncio.wait_for(task, SAFETY)
    np.testing.assert_array_equal(out["y"], [2])
    assert timeline.queued >= delay_ms / 1000 * 0.9  # waited out the delay (a lower bound only)


async def test_batches_grow_while_the_device_is_busy() -> None:
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, concurrency=1, max_batch_size=8, max_queue_delay_ms=0) as b:
        first = submit(b, xs(0))
        await asyncio.wait_for(run.started.wait(), SAFETY)
        rest = [submit(b, xs(i)) for i in range(1, 6)]
        await settle()
        assert len(run.calls) == 1
        run.gate.set()
        await result(first)
        for t in rest:
            await result(t)
    assert [c.size for c in run.calls] == [1, 5]


async def test_eager_an_idle_model_starts_a_batch_at_once() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=8, max_queue_delay_ms=FOREVER_MS, eager=True) as b:
        out, timeline = await asyncio.wait_for(submit(b, xs(1)), SAFETY)
    np.testing.assert_array_equal(out["y"], [2])
    assert [c.size for c in run.calls] == [1] and timeline.queued < 1  # never waited for the delay


async def test_eager_while_a_batch_computes_the_next_gathers_until_it_finishes() -> None:
    run = FakeRun(gate=asyncio.Event())
    # Two batches may run at once, yet a partial one waits while the model is busy.
    async with batcher(run, concurrency=2, max_batch_size=8, max_queue_delay_ms=FOREVER_MS,
                       eager=True) as b:
        first = submit(b, xs(0))
        await asyncio.wait_for(run.started.wait(), SAFETY)
        rest = [submit(b, xs(i)) for i in range(1, 6)]
        await settle()
        assert len(run.calls) == 1 and b.depth == 5
        run.gate.set()
        for t in [first, *rest]:
            await result(t)
    assert [c.size for c in run.calls] == [1, 5]


async def test_eager_a_full_batch_starts_while_another_computes() -> None:
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, concurrency=2, max_batch_size=4, max_queue_delay_ms=FOREVER_MS,
                       eager=True) as b:
        tasks = [submit(b, xs(0))]
        await asyncio.wait_for(run.started.wait(), SAFETY)
        tasks += [submit(b, xs(i)) for i in range(1, 5)]
        await settle()
        assert [c.size for c in run.calls] == [1, 4] and run.running == 2
        run.gate.set()
        for t in tasks:
            await result(t)


async def see_four_at_once(b: Batcher, run: FakeRun) -> None:
    """A lone request (which starts at once), then 3 more while it computes: the model
    has seen 4 requests in the server at once, and expects as many next time."""
    first = submit(b, xs(0))
    await asyncio.wait_for(run.started.wait(), SAFETY)
    burst = [submit(b, xs(i)) for i in range(1, 4)]
    await settle()
    run.gate.set()
    for t in [first, *burst]:
        await result(t)
    assert [c.size for c in run.calls] == [1, 3]


async def test_eager_an_idle_model_waits_for_as_many_requests_as_it_last_saw_at_once() -> None:
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, max_batch_size=8, max_queue_delay_ms=FOREVER_MS, eager=True) as b:
        await see_four_at_once(b, run)
        again = [submit(b, xs(i)) for i in range(3)]
        await settle()
        assert len(run.calls) == 2 and b.depth == 3  # 3 of the 4 it expects: waits
        again.append(submit(b, xs(3)))
        for t in again:
            await result(t)
    assert [c.size for c in run.calls] == [1, 3, 4]


async def test_eager_after_expected_requests_did_not_come_the_next_batch_starts_at_once(
) -> None:
    # Open-loop traffic: requests do not come back as they are answered. Waiting for the
    # 4 seen at once missed; the model must not make the next request wait the delay too.
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, max_batch_size=8, max_queue_delay_ms=100, eager=True) as b:
        await see_four_at_once(b, run)
        lone = submit(b, xs(4))
        await settle()
        assert len(run.calls) == 2  # it expects 4: waits for them, up to the delay
        await result(lone)
        assert [c.size for c in run.calls] == [1, 3, 1]
        last = submit(b, xs(5))
        await settle()
        assert len(run.calls) == 4  # the miss taught it: started at once, no wait
        await result(last)
    assert [c.size for c in run.calls] == [1, 3, 1, 1]


async def test_eager_the_delay_still_bounds_the_wait_while_the_model_is_busy() -> None:
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, concurrency=2, max_batch_size=8, max_queue_delay_ms=50,
                       eager=True) as b:
        first = submit(b, xs(0))
        await asyncio.wait_for(run.started.wait(), SAFETY)
        second = submit(b, xs(1))
        await settle()
        assert len(run.calls) == 1  # busy, not full: waits...
        await asyncio.sleep(0.2)
        assert [c.size for c in run.calls] == [1, 1]  # ...at most the delay
        run.gate.set()
        await result(first)
        await result(second)


async def test_different_sources_never_share_a_batch() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=2, max_queue_delay_ms=FOREVER_MS) as b:
        tasks = [submit(b, xs(1), source="a"), submit(b, xs(10), source="b"),
                 submit(b, xs(2), source="a"), submit(b, xs(20), source="b")]
        outs = [await result(t) for t in tasks]
    assert sorted((c.source, tuple(c.feeds["x"])) for c in run.calls) == [
        ("a", (1, 2)), ("b", (10, 20))]
    assert [float(o["y"][0]) for o in outs] == [2, 20, 4, 40]


async def test_inputs_of_different_shapes_or_dtypes_never_share_a_batch() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=2, max_queue_delay_ms=FOREVER_MS) as b:
        wide = [{"x": np.full((1, 3), i, dtype=np.float32)} for i in (1, 2)]
        narrow = [{"x": np.full((1, 2), i, dtype=np.float32)} for i in (1, 2)]
        ints = [{"x": np.full((1, 2), i, dtype=np.int64)} for i in (1, 2)]
        tasks = [submit(b, feeds[i]) for i in (0, 1) for feeds in (wide, narrow, ints)]
        outs = [await result(t) for t in tasks]
    assert sorted((c.feeds["x"].shape, c.feeds["x"].dtype.str) for c in run.calls) == sorted(
        [((2, 3), "<f4"), ((2, 2), "<f4"), ((2, 2), "<i8")])
    assert [o["y"].shape for o in outs] == [(1, 3), (1, 2), (1, 2)] * 2
    assert outs[2]["y"].dtype == np.int64


async def test_without_shared_passes_different_outputs_never_share_a_batch() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=2, max_queue_delay_ms=FOREVER_MS,
                       shared_passes=False) as b:
        tasks = [submit(b, xs(1), ("y",)), submit(b, xs(2), ("z",)),
                 submit(b, xs(3), ("y",)), submit(b, xs(4), ("z",))]
        outs = [await result(t) for t in tasks]
    assert sorted((c.outputs, tuple(c.feeds["x"])) for c in run.calls) == [
        (("y",), (1, 3)), (("z",), (2, 4))]
    assert all(c.masks is None for c in run.calls)
    assert [set(o) for o in outs] == [{"y"}, {"z"}, {"y"}, {"z"}]
    assert [float(next(iter(o.values()))[0]) for o in outs] == [2, 3, 6, 5]


async def test_with_shared_passes_different_outputs_share_one_batch() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=4, max_queue_delay_ms=FOREVER_MS,
                       shared_passes=True) as b:
        tasks = [submit(b, xs(1), ("y",)), submit(b, xs(2, 3), ("z",)),
                 submit(b, xs(4), ("y", "z"))]
        outs = [await result(t) for t in tasks]
    (call,) = run.calls
    assert call.outputs == ("y", "z")
    np.testing.assert_array_equal(call.masks["y"], [True, False, False, True])
    np.testing.assert_array_equal(call.masks["z"], [False, True, True, True])
    assert [set(o) for o in outs] == [{"y"}, {"z"}, {"y", "z"}]
    np.testing.assert_array_equal(outs[0]["y"], [2])
    np.testing.assert_array_equal(outs[1]["z"], [3, 4])
    np.testing.assert_array_equal(outs[2]["y"], [8])
    np.testing.assert_array_equal(outs[2]["z"], [5])


async def test_many_concurrent_requests_each_get_their_own_answer() -> None:
    rng = np.random.default_rng(0)
    choices = [("y",), ("z",), ("y", "z")]
    run = FakeRun()
    async with batcher(run, concurrency=2, max_batch_size=16, max_queue_delay_ms=1) as b:
        requests, start = [], 0
        for _ in range(200):
            n = int(rng.integers(1, 6))
            requests.append((np.arange(start, start + n, dtype=np.float32),
                             choices[int(rng.integers(3))]))
            start += n
        tasks = [submit(b, {"x": x}, outputs) for x, outputs in requests]
        outs = await asyncio.wait_for(asyncio.gather(*tasks), SAFETY * 4)
    assert_own_answers(requests, outs)
    assert all(c.size <= 16 for c in run.calls)
    assert len(run.calls) < 200  # requests really were batched together
    np.testing.assert_array_equal(np.sort(run.seen()), np.arange(start))  # each row once


# --- identical rows computed once --------------------------------------------------------

async def test_identical_rows_asked_of_different_outputs_are_computed_once() -> None:
    saved: list[int] = []
    rows: list[int] = []
    run = FakeRun()
    b = Batcher(run, BatchPolicy(max_batch_size=6, max_queue_delay_ms=FOREVER_MS), 1,
                on_batch=lambda n, seconds: rows.append(n), on_dedup=saved.append)
    b.start()
    try:  # one 6-row batch of 3 distinct rows: 1 and 2 asked of y and z, 1 twice by one
        tasks = [submit(b, xs(1, 2), ("y",)), submit(b, xs(2, 1), ("z",)),
                 submit(b, xs(1, 3), ("y", "z"))]
        outs = [await result(t) for t in tasks]
    finally:
        await b.close(timeout=1.0)
    (call,) = run.calls
    np.testing.assert_array_equal(call.feeds["x"], [1, 2, 3])
    np.testing.assert_array_equal(call.masks["y"], [True, True, True])
    np.testing.assert_array_equal(call.masks["z"], [True, True, True])
    np.testing.assert_array_equal(outs[0]["y"], [2, 4])
    np.testing.assert_array_equal(outs[1]["z"], [3, 2])
    np.testing.assert_array_equal(outs[2]["y"], [2, 6])
    np.testing.assert_array_equal(outs[2]["z"], [2, 4])
    assert rows == [6] and saved == [3]  # the batch size counts rows asked for


async def test_with_dedup_rows_off_every_row_is_computed() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=4, max_queue_delay_ms=FOREVER_MS,
                       dedup_rows=False) as b:
        tasks = [submit(b, xs(1, 1), ("y",)), submit(b, xs(1, 1), ("z",))]
        outs = [await result(t) for t in tasks]
    np.testing.assert_array_equal(run.seen(), [1, 1, 1, 1])
    np.testing.assert_array_equal(outs[0]["y"], [2, 2])
    np.testing.assert_array_equal(outs[1]["z"], [2, 2])


async def test_a_batch_of_distinct_rows_reaches_run_as_merged() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=3, max_queue_delay_ms=FOREVER_MS) as b:
        tasks = [submit(b, xs(1), ("y",)), submit(b, xs(2, 3), ("z",))]
        for t in tasks:
            await result(t)
    (call,) = run.calls
    np.testing.assert_array_equal(call.feeds["x"], [1, 2, 3])
    np.testing.assert_array_equal(call.masks["y"], [True, False, False])


async def test_many_concurrent_requests_with_repeated_rows_each_get_their_own_answer() -> None:
    rng = np.random.default_rng(1)
    choices = [("y",), ("z",), ("y", "z")]
    run = FakeRun()
    async with batcher(run, concurrency=2, max_batch_size=16, max_queue_delay_ms=1) as b:
        requests = [(rng.integers(0, 5, size=int(rng.integers(1, 12))).astype(np.float32),
                     choices[int(rng.integers(3))]) for _ in range(100)]
        tasks = [submit(b, {"x": x}, outputs) for x, outputs in requests]
        outs = await asyncio.wait_for(asyncio.gather(*tasks), SAFETY * 4)
    assert_own_answers(requests, outs)
    assert all(len(np.unique(c.feeds["x"])) == c.size <= 5 for c in run.calls)  # no repeats
    assert sum(c.size for c in run.calls) < sum(len(x) for x, _ in requests) / 2


async def test_an_expired_copy_of_a_row_is_not_computed_nor_answered() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=3, max_queue_delay_ms=FOREVER_MS) as b:
        late = submit(b, xs(4), ("z",), deadline=time.monotonic() - 1)
        ok = [submit(b, xs(4), ("y",)), submit(b, xs(4), ("y",))]
        with pytest.raises(DeadlineExceeded):
            await result(late)
        assert [float((await result(t))["y"][0]) for t in ok] == [8, 8]
    (call,) = run.calls
    assert call.outputs == ("y",) and call.masks is None  # z was asked only by the late one
    np.testing.assert_array_equal(call.feeds["x"], [4])


# --- refusals, deadlines, cancellation ---------------------------------------------------

async def test_a_full_queue_is_overloaded() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=100, max_queue_delay_ms=FOREVER_MS,
                       max_queue_size=4) as b:
        waiting = [submit(b, xs(1, 2)), submit(b, xs(3, 4))]
        await settle()
        assert b.depth == 4
        with pytest.raises(Overloaded, match="queue is full"):
            await b.submit("g", xs(5), ("y",))
        for t in waiting:
            t.cancel()
    assert run.calls == []


async def test_an_expired_deadline_is_not_computed() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=2, max_queue_delay_ms=FOREVER_MS) as b:
        late = submit(b, xs(-1), deadline=time.monotonic() - 1)  # -1 would fail `run`
        ok = submit(b, xs(7), deadline=time.monotonic() + 60)
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await result(late)
        np.testing.assert_array_equal((await result(ok))["y"], [14])
    np.testing.assert_array_equal(run.seen(), [7])


async def test_a_batch_of_only_expired_requests_does_not_run() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=1, max_queue_delay_ms=0) as b:
        with pytest.raises(DeadlineExceeded):
            await result(submit(b, xs(1), deadline=time.monotonic() - 1))
        np.testing.assert_array_equal((await result(submit(b, xs(2))))["y"], [4])
    np.testing.assert_array_equal(run.seen(), [2])


async def test_a_cancelled_request_is_dropped_before_compute() -> None:
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, concurrency=1, max_batch_size=1, max_queue_delay_ms=0) as b:
        busy = submit(b, xs(1))
        await asyncio.wait_for(run.started.wait(), SAFETY)
        gone = submit(b, xs(-5))  # queued behind the busy batch
        await settle()
        gone.cancel()
        await settle()
        later = submit(b, xs(3))
        run.gate.set()
        await result(busy)
        np.testing.assert_array_equal((await result(later))["y"], [6])
        assert gone.cancelled()
    np.testing.assert_array_equal(run.seen(), [1, 3])


async def test_a_cancelled_piece_of_a_split_request_frees_its_siblings() -> None:
    """Cancelling a sliced request drops every one of its queued pieces."""
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, concurrency=1, max_batch_size=2, max_queue_delay_ms=0) as b:
        busy = submit(b, xs(1))
        await asyncio.wait_for(run.started.wait(), SAFETY)
        big = submit(b, xs(-1, -2, -3, -4, -5))
        await settle()
        big.cancel()
        await settle()
        run.gate.set()
        await result(busy)
        await result(submit(b, xs(9)))
    np.testing.assert_array_equal(run.seen(), [1, 9])


# --- concurrency and failures ------------------------------------------------------------

async def test_at_most_concurrency_batches_run_at_once() -> None:
    run = FakeRun(gate=asyncio.Event())
    async with batcher(run, concurrency=2, max_batch_size=1, max_queue_delay_ms=0) as b:
        tasks = [submit(b, xs(i)) for i in range(6)]
        await settle(50)
        assert run.running == 2 and len(run.calls) == 2
        assert b.depth == 4
        run.gate.set()
        outs = [await result(t) for t in tasks]
    assert run.max_running == 2
    assert len(run.calls) == 6
    assert [float(o["y"][0]) for o in outs] == [0, 2, 4, 6, 8, 10]


async def test_a_request_the_model_cannot_compute_fails_alone() -> None:
    # Regression: one bad request once failed every request batched with it.
    run = FakeRun()
    async with batcher(run, max_batch_size=3, max_queue_delay_ms=FOREVER_MS) as b:
        tasks = [submit(b, xs(1)), submit(b, xs(-1)), submit(b, xs(2))]  # one batch
        with pytest.raises(ValueError, match="negative"):
            await result(tasks[1])
        assert float((await result(tasks[0]))["y"][0]) == 2
        assert float((await result(tasks[2]))["y"][0]) == 4
        # The batch, then its halves, the failing half halved again.
        assert [len(c.feeds["x"]) for c in run.calls] == [3, 1, 2, 1, 1]
        later = [submit(b, xs(2)), submit(b, xs(3)), submit(b, xs(4))]
        assert [float((await result(t))["y"][0]) for t in later] == [4, 6, 8]


async def test_two_bad_requests_among_sixteen_are_found_by_halves_with_one_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two clients sending rows the model cannot compute halved 16 others' throughput: each
    failed batch was rerun one request at a time, with a WARNING each time."""
    run = FakeRun()
    bad = {3, 12}
    async with batcher(run, max_batch_size=18, max_queue_delay_ms=FOREVER_MS) as b:
        for _ in range(2):  # the second failed batch logs no line
            run.calls.clear()
            tasks = [submit(b, xs(-i if i in bad else i)) for i in range(18)]  # one batch
            for i, task in enumerate(tasks):
                if i in bad:
                    with pytest.raises(ValueError, match="negative"):
                        await result(task)
                else:
                    assert float((await result(task))["y"][0]) == 2 * i
            # Halving: 15 runs (2 failing among 18), where one run a request took 19.
            assert len(run.calls) == 15, [len(c.feeds["x"]) for c in run.calls]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "batch of 18 requests failed (negative input)" in warnings[0].getMessage()


async def test_a_run_returning_the_wrong_row_count_fails_its_batch() -> None:
    calls = 0

    async def short(batch: Batch) -> tuple[Arrays, float, float]:
        nonlocal calls
        calls += 1
        result = compute(batch.feeds, batch.outputs, batch.masks)
        return ({k: v[:-1] for k, v in result.items()} if calls == 1 else result), 0.0, 0.001

    b = Batcher(short, BatchPolicy(max_batch_size=1, max_queue_delay_ms=0), 1)
    b.start()
    try:
        with pytest.raises(RuntimeError, match="0 rows for output 'y', expected 1"):
            await result(submit(b, xs(1)))
        np.testing.assert_array_equal((await result(submit(b, xs(2))))["y"], [4])
    finally:
        await b.close(timeout=1.0)


async def test_callbacks_report_batch_rows_and_queue_depth() -> None:
    batches: list[int] = []
    depths: list[int] = []
    run = FakeRun()
    b = Batcher(run, BatchPolicy(max_batch_size=3, max_queue_delay_ms=FOREVER_MS), 1,
                on_batch=lambda rows, seconds: batches.append((rows, seconds)),
                on_depth=depths.append)
    b.start()
    try:
        await result(submit(b, xs(1, 2, 3)))
    finally:
        await b.close(timeout=1.0)
    assert batches == [(3, 0.001)]  # the seconds `run` said its computing took
    assert depths[0] == 3 and depths[-1] == 0


# --- shutdown ----------------------------------------------------------------------------

async def test_close_finishes_queued_work_then_refuses_new_submits() -> None:
    run = FakeRun()
    b = Batcher(run, BatchPolicy(max_batch_size=4, max_queue_delay_ms=20), 1)
    b.start()
    tasks = [submit(b, xs(i)) for i in range(6)]
    await settle()
    await asyncio.wait_for(b.close(), SAFETY)
    assert [float((await result(t))["y"][0]) for t in tasks] == [0, 2, 4, 6, 8, 10]
    with pytest.raises(NotReady):
        await b.submit("g", xs(1), ("y",))


async def test_close_with_a_timeout_cancels_what_is_left() -> None:
    run = FakeRun()
    b = Batcher(run, BatchPolicy(max_batch_size=4, max_queue_delay_ms=FOREVER_MS,
                                 eager=False), 1)
    b.start()
    task = submit(b, xs(1))
    await settle()
    await asyncio.wait_for(b.close(timeout=0.05), SAFETY)
    with pytest.raises(Cancelled):
        await result(task)
    assert run.calls == []


async def test_a_full_group_does_not_wait_behind_an_older_partial_one() -> None:
    # Regression: the loop once waited out the oldest group's delay even when a younger
    # group already had a full batch.
    run = FakeRun()
    async with batcher(run, max_batch_size=2, max_queue_delay_ms=FOREVER_MS) as b:
        partial = submit(b, xs(1), source="old")
        await settle()
        full = submit(b, xs(2, 3), source="young")
        out = await result(full)
        np.testing.assert_array_equal(out["y"], [4, 6])
        assert not partial.done()
    with pytest.raises(Cancelled):
        await partial


async def test_one_large_request_cannot_overshoot_the_queue_limit() -> None:
    run = FakeRun()
    async with batcher(run, max_batch_size=8, max_queue_delay_ms=FOREVER_MS,
                       max_queue_size=4) as b:
        waiting = submit(b, xs(1))
        await settle()
        with pytest.raises(Overloaded, match="this request 4"):
            await asyncio.wait_for(b.submit("g", xs(1, 2, 3, 4), ("y",)), SAFETY)
        assert not waiting.done()
    with pytest.raises(Cancelled):
        await waiting


async def test_a_request_larger_than_the_queue_is_refused_even_into_an_empty_queue() -> None:
    # Regression: the limit was checked only when rows were waiting, so one 409,600-row
    # request got into an empty queue and held up every request behind it for 21 s.
    run = FakeRun()
    async with batcher(run, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=4) as b:
        assert b.depth == 0
        with pytest.raises(Overloaded, match=r"5 rows, more than .* \(max_queue_size 4\): "
                                             r"send at most 4 rows"):
            await asyncio.wait_for(b.submit("g", xs(1, 2, 3, 4, 5), ("y",)), SAFETY)
        assert b.depth == 0
        np.testing.assert_array_equal(  # exactly the limit still goes through
            (await asyncio.wait_for(b.submit("g", xs(1, 2, 3, 4), ("y",)), SAFETY))[0]["y"],
            compute(xs(1, 2, 3, 4), ("y",), None)["y"])
    assert sum(len(next(iter(c.feeds.values()))) for c in run.calls) == 4
