"""Executes a loaded model: devices, compute threads, shared passes, warm-up.

The backend-free part: `Runtime` runs batches on executor threads it owns, never on the
event loop. The backends' runtimes (service/runtime_tf.py, service/runtime_jax.py) provide
the compiled functions; service/backends.py picks one by --backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Generic, TypeVar

import numpy as np

from service.errors import ConfigError, InvalidInput
from service.explain import Explanation
from service.types import STRING, Batch, TensorSpec

Arrays = dict[str, np.ndarray]
# Traces (compiles) a model may make on the request path per interval.
TRACE_BUDGET = 8
TRACE_INTERVAL_S = 60


def zeros(spec: TensorSpec, rows: int) -> np.ndarray:
    shape = (rows, *(d or 1 for d in spec.shape[1:]))
    if spec.dtype == STRING:
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=spec.dtype)


def pad_rows(rows: int, limit: int) -> int:
    """The padded batch size under XLA: the next power of two, so few shapes compile."""
    return min(1 << max(rows - 1, 0).bit_length(), max(limit, rows))


K = TypeVar("K", bound=Hashable)
F = TypeVar("F")


class CompiledStore(Generic[K, F]):
    """A runtime's compiled functions by key, and the budget of compiles on the request path.

    What warm-up compiles (and a full pass) is pinned for the version's life; what the
    request path compiles sits in an LRU of `size`, so a client cycling taps cannot grow
    it, nor evict the endpoints' own. A compile (a trace, an XLA program) holds a core and
    often the GIL for a while, stalling every request: past `budget` of them in
    TRACE_INTERVAL_S, `may_compile` says no and the runtime serves another way.
    """

    def __init__(self, size: int, budget: int = TRACE_BUDGET) -> None:
        self.size = size
        self.budget = budget
        self.warming = False  # set while warm-up compiles: pinned, and not budgeted
        self._lru: OrderedDict[K, F] = OrderedDict()
        self._pinned: dict[K, F] = {}
        self._begun: deque[float] = deque()  # when request-path compiles began
        self._lock = threading.Lock()

    def get(self, key: K) -> F | None:
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return self._lru[key]
            return self._pinned.get(key)

    def pinned(self, key: K) -> F | None:
        with self._lock:
            return self._pinned.get(key)

    def put(self, key: K, fn: F, pin: bool = False) -> F:
        """Keep `fn` (pinned while warming or if `pin`); return the one kept under `key`
        (a pinned one another thread compiled first wins)."""
        with self._lock:
            if self.warming or pin:
                return self._pinned.setdefault(key, fn)
            self._lru[key] = fn
            while len(self._lru) > self.size:
                self._lru.popitem(last=False)
            return fn

    def may_compile(self) -> bool:
        """Count one request-path compile against the budget if it has room."""
        now = time.monotonic()
        with self._lock:
            if self.warming:
                return True
            while self._begun and self._begun[0] < now - TRACE_INTERVAL_S:
                self._begun.popleft()
            if len(self._begun) >= self.budget:
                return False
            self._begun.append(now)
            return True

    def held(self) -> list[K]:
        """Every key held, pinned or in the LRU."""
        with self._lock:
            return [*self._pinned, *self._lru]

    def cached(self) -> list[K]:
        """The LRU's keys (what the request path compiled), least recently used first."""
        with self._lock:
            return list(self._lru)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._pinned.clear()


class Runtime:
    """Runs batches of one model: picks a device, runs off the loop, returns numpy.

    Subclasses provide `specs` and `_compute` (blocking, called on an executor thread),
    and `spec` if their tensors can be named outside their endpoints' specs (a Keras
    model's taps).
    """

    def __init__(self, devices: Sequence[str], batches_per_device: int) -> None:
        self.devices = list(devices)
        self.slots = len(self.devices) * batches_per_device
        self._executors = {d: ThreadPoolExecutor(batches_per_device, f"compute{d}")
                           for d in self.devices}
        self._next_device = itertools.cycle(self.devices)
        self._shared: dict[Hashable, tuple[str, ...]] = {}  # warmed shared pass per source

    def specs(self, source: Hashable) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        raise NotImplementedError

    def spec(self, name: str) -> TensorSpec:
        """One tensor's spec by name, wherever it is in the model."""
        raise NotImplementedError(f"{type(self).__name__} has no tensor {name!r} by name")

    def _compute(self, batch: Batch) -> Arrays:
        raise NotImplementedError

    def _explain(self, batch: Batch) -> Arrays:
        """An explain endpoint's batch (its source is an Explanation): its attribution."""
        raise ConfigError(f"{type(self).__name__} cannot explain: explain endpoints need a "
                          "Keras model's layer graph")

    async def run(self, batch: Batch) -> tuple[Arrays, float, float]:
        """Compute the batch's outputs; and when (time.monotonic()) its thread began and
        ended computing it, so neither the wait for a free thread nor the wait for the
        event loop to resume counts as compute. With masks, output o holds only
        masks[o]'s rows."""
        device = next(self._next_device)
        loop = asyncio.get_running_loop()
        wide = self._widen(batch)
        result, began, ended = await loop.run_in_executor(
            self._executors[device], self._on_device, device, wide)
        if wide is not batch:
            result = {name: result[name] for name in batch.outputs}
        return result, began, ended

    def _widen(self, batch: Batch) -> Batch:
        """A shared pass asking part of its source's warmed pass runs the warmed one, its
        other outputs on one row each: a trace holds the GIL for seconds, stalling every
        request of the server, where a head on one row costs microseconds."""
        union = self._shared.get(batch.source)
        if batch.masks is None or union is None or batch.outputs == union \
                or not set(batch.outputs) <= set(union):
            return batch
        one = np.zeros(batch.rows, dtype=bool)
        one[0] = True
        masks = {name: batch.masks.get(name, one) for name in union}
        return Batch(batch.source, union, batch.feeds, masks)

    def _placed(self, device: str) -> AbstractContextManager[object]:
        """Where the backend runs what is computed inside: `device`."""
        return contextlib.nullcontext()

    def _input_error(self, exc: Exception) -> str | None:
        """The backend's own sentence if `exc` is its error about the input's values (e.g.
        a token outside an Embedding's vocabulary), else None: not the client's fault."""
        return None

    def _on_device(self, device: str, batch: Batch) -> tuple[Arrays, float, float]:
        began = time.monotonic()
        try:
            compute = self._explain if isinstance(batch.source, Explanation) else self._compute
            with self._placed(device):
                result = compute(batch)
            return result, began, time.monotonic()
        except InvalidInput:
            raise
        except Exception as exc:
            reason = self._input_error(exc)
            if reason is None:
                raise
            raise InvalidInput(f"the model cannot compute this input: {reason}") from exc

    def warm_up(self, source: Hashable, outputs: tuple[str, ...],
                masks: Arrays | None = None) -> None:
        """Trace and run once, so no request pays for it. With masks, `outputs` is the
        shared pass of every endpoint on `source`: a batch asking any subset of it runs
        that warmed pass (see `_widen`) instead of tracing one of its own."""
        inputs, _ = self.specs(source)
        n = 2 if masks is not None else 1
        feeds = {name: zeros(spec, n) for name, spec in inputs.items()}
        for device in self.devices:
            self._on_device(device, Batch(source, outputs, feeds, masks))
        if masks is not None:
            self._shared[source] = outputs

    def close(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=True)
