"""Dynamic batching: requests queue per model and leave together as one forward pass.

The batcher takes a function, not a model: `run(batch)` computes one merged Batch and
says how many seconds the computing itself took.
Requests with the same `source` (what the runtime computes from, e.g. the endpoint's
inputs) whose inputs have the same non-batch shapes and dtypes may share a batch even
when they ask for different outputs: then `batch.masks` holds a boolean mask per output,
and each output comes back holding only the rows that asked for it (a shared pass).
`merge` and `split` are pure numpy, tested alone. Between them, rows with byte-identical
inputs are computed once (service/dedup.py) unless the policy turns that off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from service.dedup import distinct
from service.errors import Cancelled, DeadlineExceeded, NotReady, Overloaded, TapserveError
from service.tracing import RequestTrace, current, record_batch
from service.types import Batch

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
# A batch's outputs, and when (time.monotonic()) its compute thread began and ended it.
RunBatch = Callable[[Batch], Awaitable[tuple[Arrays, float, float]]]
ISOLATION_LOG_S = 60.0  # at most one line an interval about batches that failed


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 4.0
    max_queue_size: int = 1024  # rows queued before new work is refused
    shared_passes: bool = True
    eager: bool = True  # an idle model starts a batch once the requests it expects came
    dedup_rows: bool = True  # byte-identical rows of one batch are computed once


@dataclass
class Work:
    """One queued piece: a request, or a slice of one larger than max_batch_size."""

    source: Hashable
    feeds: Arrays
    outputs: tuple[str, ...]
    deadline: float | None
    future: asyncio.Future[Arrays]
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its batch formed (the times below are its batch's)
    began: float = 0.0  # a compute thread took the batch
    ended: float = 0.0  # the thread finished it
    returned: float = 0.0  # the event loop took the result back and answered the pieces
    trace: RequestTrace | None = None  # its request's spans (tracing on)
    weight: int = 1  # rows of compute per row (an integrated-gradients row runs `steps`)

    @property
    def rows(self) -> int:
        """How many rows it holds."""
        return len(next(iter(self.feeds.values())))

    @property
    def cost(self) -> int:
        """The rows it counts as against max_batch_size and the queue's limit."""
        return self.rows * self.weight


def merge(works: Sequence[Work]) -> Batch:
    """Concatenate the works' inputs; mask rows per output if they asked differently."""
    feeds = {name: np.concatenate([w.feeds[name] for w in works]) if len(works) > 1
             else works[0].feeds[name] for name in works[0].feeds}
    if all(w.outputs == works[0].outputs for w in works):
        return Batch(works[0].source, works[0].outputs, feeds, None)
    outputs = tuple(sorted({o for w in works for o in w.outputs}))
    masks = {o: np.concatenate([np.full(w.rows, o in w.outputs) for w in works])
             for o in outputs}
    return Batch(works[0].source, outputs, feeds, masks)


def batch_rows(works: Sequence[Work]) -> int:
    return sum(w.rows for w in works)


def split(works: Sequence[Work], batch: Batch, result: Arrays) -> list[Arrays]:
    """Each work's slice of the batch result, checking every output's row count."""
    batch.check(result)
    offsets = dict.fromkeys(batch.outputs, 0)
    parts = []
    for w in works:
        part = {}
        for name in w.outputs:
            part[name] = result[name][offsets[name]:offsets[name] + w.rows]
        for name in batch.outputs if batch.masks is None else w.outputs:
            offsets[name] += w.rows
        parts.append(part)
    return parts


class Timeline(NamedTuple):
    """When a request passed the batcher's stages (time.monotonic()); of a request in
    several pieces, the piece answered last (a piece waits for its siblings)."""

    enqueued: float  # queued, its checks done
    started: float  # its batch formed
    began: float  # a compute thread took its batch
    ended: float  # the thread finished computing
    returned: float  # the event loop took the result back
    resumed: float  # the request's own task ran again, its outputs in hand

    @property
    def queued(self) -> float:
        """Seconds it waited for its batch to start."""
        return self.started - self.enqueued


class Group(deque[Work]):
    """The queued works that may share a batch, oldest first, and the rows they count as."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0


def slices(feeds: Arrays, size: int) -> list[Arrays]:
    """A request cut into pieces of at most `size` rows (most fit: then it is its one piece)."""
    rows = len(next(iter(feeds.values())))
    if rows <= size:
        return [feeds]
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, rows, size)]


class Batcher:
    """One queue per model version, one background task forming batches.

    A batch closes at max_batch_size rows or max_queue_delay_ms after its first
    request arrived, or (eager) once no batch of this version is computing and as many
    requests wait as were in the server at once during the last batch's wait: a lone
    client never waits on the clock, a closed loop of 8 clients gathers its 8, and while
    a batch computes the next one gathers, so no delay needs tuning (Triton's and TF
    Serving's advice for CPUs: batch what is queued when a worker frees up). At most
    `concurrency` batches run at once.
    """

    def __init__(self, run: RunBatch, policy: BatchPolicy, concurrency: int,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_dedup: Callable[[int], None] | None = None) -> None:
        self.run = run
        self.policy = policy
        self.concurrency = concurrency
        self._on_batch = on_batch or (lambda rows, seconds: None)
        self._on_depth = on_depth or (lambda rows: None)
        self._on_dedup = on_dedup or (lambda rows: None)  # rows a batch did not compute
        self._pending: OrderedDict[Hashable, Group] = OrderedDict()
        self._depth = 0
        self._pieces = 0  # works queued, over all groups
        # Eager batching's target: an idle model starts a batch once as many requests wait
        # as were in the server at once during the last batch's wait (its concurrency).
        self._in_flight = 0  # pieces submitted and not yet answered
        self._peak = 0  # the most in flight since the last batch started
        self._target = 1
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        # Set while the batch loop waits for a batch to become ready; resolved by `_wake`.
        self._waiter: asyncio.Future[None] | None = None
        self._isolated = 0  # failed batches since the last line saying so
        self._isolation_logged: float | None = None

    def start(self) -> None:
        # Made inside the running loop: asyncio primitives bind to it.
        self._slots = asyncio.Semaphore(self.concurrency)
        self._task = asyncio.create_task(self._loop(), name="batcher")

    @property
    def depth(self) -> int:
        """Rows waiting."""
        return self._depth

    async def submit(self, source: Hashable, feeds: Arrays, outputs: tuple[str, ...],
                     deadline: float | None = None, weight: int = 1
                     ) -> tuple[Arrays, Timeline]:
        """Queue one request; wait for its outputs and when it passed each stage.

        A request larger than max_batch_size is split into pieces and reassembled. Each
        row counts as `weight` rows (the same for every request of one `source`).
        """
        if self._closed:
            raise NotReady("the model is shutting down")
        rows = len(next(iter(feeds.values())))
        cost = rows * weight
        counts = f"{rows} rows" if weight == 1 else f"{rows} rows of {weight} each, {cost}"
        limit = self.policy.max_queue_size
        if cost > limit:  # even into an empty queue: it would hold every other request up
            raise Overloaded(f"the request has {counts}, more than the model's queue holds "
                             f"(max_queue_size {limit}): send at most "
                             f"{max(1, limit // weight)} rows per request")
        if self._depth + cost > limit:
            raise Overloaded(f"the queue is full ({self._depth} rows waiting, limit "
                             f"{limit}, this request {cost}); retry later")
        # Only inputs of the same shapes concatenate; without shared passes, only
        # requests for the same outputs share a batch.
        group = (source, tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feeds.items())),
                 None if self.policy.shared_passes else outputs)
        loop = asyncio.get_running_loop()
        trace = current()
        works = [Work(source, part, outputs, deadline, loop.create_future(), weight=weight,
                      trace=trace)
                 for part in slices(feeds, max(1, self.policy.max_batch_size // weight))]
        first = not self._pending  # then no timer runs: the loop waits for work
        queue = self._pending.get(group)
        if queue is None:
            queue = self._pending[group] = Group()
        for w in works:
            queue.append(w)
            queue.rows += w.cost
        self._depth += cost
        self._pieces += len(works)
        self._on_depth(self._depth)
        self._in_flight += len(works)
        self._peak = max(self._peak, self._in_flight)
        # Wake the batch loop only when this arrival can start a batch (or is the first to
        # wait): a wake-up per request cost the event loop more than its batching.
        if first or queue.rows >= self.policy.max_batch_size or self._eager_ready():
            self._wake()
        try:
            parts = ([await works[0].future] if len(works) == 1  # most: no gather to make
                     else await asyncio.gather(*(w.future for w in works)))
        finally:
            self._in_flight -= len(works)
            for w in works:
                w.future.cancel()  # a no-op once done; frees siblings of a failed piece
        # Every piece was answered, so its batch started and returned.
        last = works[0] if len(works) == 1 else max(works, key=lambda w: w.returned)
        timeline = Timeline(last.enqueued, last.started or last.enqueued, last.began, last.ended,
                            last.returned, time.monotonic())
        if len(parts) == 1:
            return parts[0], timeline
        return ({name: np.concatenate([p[name] for p in parts]) for name in outputs},
                timeline)

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                works = await self._next_batch()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            task = asyncio.create_task(self._compute(works))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake()  # an idle model may start its next batch now

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _idle(self) -> bool:
        """Eager batching applies: no batch of this version is computing."""
        return self.policy.eager and not self._running

    def _eager_ready(self) -> bool:
        return self._idle() and self._pieces >= self._target

    async def _next_batch(self) -> list[Work]:
        """Wait for a group whose batch is full, or whose first request's delay is up,
        or (eager) any group once no batch is computing and the requests expected have
        come."""
        delay = self.policy.max_queue_delay_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            now, group, close_at = time.monotonic(), None, float("inf")
            ready = self._eager_ready()
            for key, queue in self._pending.items():  # oldest group first
                if ready or queue.rows >= self.policy.max_batch_size:
                    group = key
                    break
                if queue[0].enqueued + delay < close_at:
                    close_at, oldest = queue[0].enqueued + delay, key
            # An idle model whose expected requests did not come within the delay
            # learns that its traffic does not come back as answered (open-loop clients).
            missed = False
            if group is None and close_at <= now:
                group, missed = oldest, self._idle()
            if group is not None:
                break
            # One future, resolved by a wake-up or at close_at (on time.monotonic()'s
            # clock: uvloop's loop.time() is another, in whole milliseconds).
            self._waiter = loop.create_future()
            timer = (None if close_at == float("inf")
                     else loop.call_later(max(0.0, close_at - now), self._wake))
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        queue = self._pending[group]
        works: list[Work] = []
        rows = 0
        # One piece at least: a row of integrated gradients may cost more than a batch.
        while queue and (not works or rows + queue[0].cost <= self.policy.max_batch_size):
            w = queue.popleft()
            rows += w.cost
            works.append(w)
        queue.rows -= rows
        self._pieces -= len(works)
        # As many as were in the server at once during this wait are expected next time;
        # a lone client (1) never waits, a closed loop of 8 gathers its 8. After a miss
        # the next batch expects none: waiting again would cost every request the delay.
        self._target, self._peak = 1 if missed else max(self._peak, 1), self._in_flight
        if not queue:
            del self._pending[group]
        else:
            self._pending.move_to_end(group)  # let other groups go next: no starvation
        self._depth -= rows
        self._on_depth(self._depth)
        return works

    async def _compute(self, works: list[Work]) -> None:
        try:
            works = self._drop_expired(works)
            if works:
                await self._run_batch(works, isolate=len(works) > 1)
        finally:
            self._slots.release()

    async def _run_batch(self, works: list[Work], isolate: bool) -> None:
        """Run works as one batch. If it fails, find the requests that fail by halves
        (isolate): a request the model cannot compute (say, a token out of its vocabulary)
        fails by itself, and the others are answered."""
        exc = await self._attempt(works)
        if exc is None:
            return
        if isolate and len(works) > 1:
            self._isolating(len(works), exc)
            await self._bisect(works)
        else:
            self._fail(works, exc)

    async def _bisect(self, works: list[Work]) -> None:
        """Each half as a batch, a failing half halved again: k failing requests among n
        cost about 2k·log2(n/k) runs, where one run a request cost n (two bad clients
        among 16 once halved the others' throughput)."""
        half = len(works) // 2
        for part in (works[:half], works[half:]):
            exc = await self._attempt(part)
            if exc is not None and len(part) > 1:
                await self._bisect(part)
            elif exc is not None:
                self._fail(part, exc)

    async def _attempt(self, works: list[Work]) -> Exception | None:
        """Run works as one batch and answer them; or the error, answering none."""
        batch = merge(works)
        rows = distinct(batch) if self.policy.dedup_rows else None
        started = time.monotonic()
        for w in works:
            w.started = w.started or started
        try:
            if rows is None:
                result, began, ended = await self.run(batch)
            else:
                computed, began, ended = await self.run(rows.batch)
                result = rows.expand(computed)
            parts = split(works, batch, result)
        except Exception as exc:
            record_batch(works, started, exc)
            return exc
        returned = time.monotonic()
        for w in works:
            w.began, w.ended, w.returned = began, ended, returned
        record_batch(works, started)
        self._on_batch(batch_rows(works), ended - began)
        if rows is not None:
            self._on_dedup(rows.saved)
        for w, part in zip(works, parts, strict=True):
            if not w.future.done():
                w.future.set_result(part)
        return None

    def _fail(self, works: list[Work], exc: Exception) -> None:
        if not isinstance(exc, TapserveError):
            log.error("batch of %d rows failed", batch_rows(works), exc_info=exc)
        for w in works:
            if not w.future.done():
                w.future.set_exception(exc)

    def _isolating(self, requests: int, exc: Exception) -> None:
        """Log a failed batch, at most one line an interval: a client sending what the
        model cannot compute must not flood the log."""
        self._isolated += 1
        now = time.monotonic()
        if self._isolation_logged is None or now - self._isolation_logged >= ISOLATION_LOG_S:
            log.warning("batch of %d requests failed (%s); finding the failing requests by "
                        "halves (%d failed batches since the last such line; one a minute)",
                        requests, exc, self._isolated)
            self._isolation_logged, self._isolated = now, 0

    @staticmethod
    def _drop_expired(works: list[Work]) -> list[Work]:
        """Requests cancelled or past their deadline are answered without compute."""
        now, keep = time.monotonic(), []
        for w in works:
            if w.future.done():
                continue  # cancelled by the client
            if w.deadline is not None and now >= w.deadline:
                w.future.set_exception(DeadlineExceeded(
                    f"the deadline passed after {now - w.enqueued:.3f}s in the queue; "
                    "the request was not computed"))
                continue
            keep.append(w)
        return keep

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking work, let queued and running batches finish, then stop."""
        self._closed = True
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while (self._pending or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._pending.values():
            for w in queue:
                if not w.future.done():
                    w.future.set_exception(Cancelled("the server stopped before computing it"))
