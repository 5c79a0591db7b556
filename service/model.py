"""One served model version: its endpoints, the checks a request must pass for one, and
its batcher. Its life: start → infer … → close (stop taking work, finish it, free it)."""

from __future__ import annotations

import ctypes
import gc
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from service.batcher import Batcher, BatchPolicy, Timeline
from service.errors import ConfigError, InvalidInput, NotFound, NotReady, clip
from service.explain import TARGET, Explanation, targets
from service.modelcode import forget_model_code
from service.repository import ModelSource
from service.runtime import Runtime
from service.statistics import VersionStatistics
from service.types import STRING, Batch, EndpointMetadata, TensorSpec
from service.validation import suggest

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "default"
_LIBC = ctypes.CDLL(None)  # the process's C library (malloc_trim, where glibc)
# The most bytes of outputs one request may ask for, unless the loader sets the server's.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# What a response takes beside its outputs' values: its model name, version and id, and each
# output's name, datatype and shape (gRPC's send limit counts them too).
FRAMING_BYTES = 1024
FRAMING_BYTES_PER_OUTPUT = 64
# The longest number orjson writes for one element of each dtype (-2.2250738585072014e-308:
# 24), plus 3: a comma and, at worst, a nested list's brackets. Strings: at least "".
JSON_ELEMENT_BYTES = {"bool": 8, "int8": 7, "uint8": 6, "int16": 9, "uint16": 8, "int32": 14,
                      "uint32": 13, "int64": 23, "uint64": 23, "float16": 19, "float32": 19,
                      "float64": 27, STRING: 5}


@dataclass(frozen=True)
class Endpoint:
    """One servable cut of a model: fixed inputs, default outputs, what else may be asked."""

    name: str
    source: Hashable  # what the runtime computes from: input tap names, or a signature
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    askable: frozenset[str]  # outputs a request may name (its outputs, plus taps if allowed)
    taps_hint: str  # why a name outside `askable` cannot be asked for

    @property
    def explanation(self) -> Explanation | None:
        """What an explain endpoint computes; None for a forward pass."""
        return self.source if isinstance(self.source, Explanation) else None

    @cached_property
    def inputs_by_name(self) -> Mapping[str, TensorSpec]:
        """The inputs every request sends, by name (built once: every request looks its
        inputs up in it). An explanation's optional `target` is not among them: it takes
        INT32 or INT64 and is checked by explain.targets."""
        return {s.name: s for s in self.inputs
                if self.explanation is None or s.name != TARGET}


@dataclass
class Prepared:
    """A request checked against its endpoint, ready for the batcher."""

    endpoint: Endpoint
    outputs: tuple[str, ...]
    feeds: dict[str, np.ndarray]
    rows: int


class LoadedModel:
    """One version of one model, loaded, its endpoints defined and warmed up; once
    started, the front door of that version: every request to it goes through `infer`."""

    def __init__(self, source: ModelSource, runtime: Runtime, endpoints: dict[str, Endpoint],
                 default_endpoint: str, platform: str, code_modules: Sequence[str] = (),
                 refused: Mapping[str, str] | None = None) -> None:
        self.name = source.name
        self.version = source.version
        self.source = source
        self.runtime = runtime
        self.endpoints = endpoints
        # Explain endpoints whose config did not fit, and why: the others serve without them.
        self.refused = dict(refused or {})
        self.default_endpoint = default_endpoint
        self.platform = platform
        self.policy = BatchPolicy()
        self.max_response_bytes = MAX_RESPONSE_BYTES
        self._code_modules = list(code_modules)
        self._batcher: Batcher | None = None
        self._row_bytes: dict[tuple[str, str, bool], int] = {}  # an output's bytes a row
        self.stats = VersionStatistics()

    def start(self, on_batch: Callable[[int, float], None] | None = None,
              on_depth: Callable[[int], None] | None = None,
              on_dedup: Callable[[int], None] | None = None,
              on_explain: Callable[[str, float], None] | None = None) -> None:
        """Start batching (inside the running event loop). `on_explain(endpoint, seconds)`
        hears each explanation batch's compute time, which differs from a forward pass's."""
        # One batch more than the compute threads: it waits in the runtime's executor, so a
        # thread that finishes starts the next batch at once, not after an event-loop turn.
        def batched(rows: int, seconds: float) -> None:
            self.stats.batch(rows, seconds)
            if on_batch:
                on_batch(rows, seconds)

        async def timed(batch: Batch) -> tuple[dict[str, np.ndarray], float, float]:
            result, began, ended = await self.runtime.run(batch)
            if on_explain is not None and isinstance(batch.source, Explanation):
                on_explain(batch.source.endpoint, ended - began)
            return result, began, ended

        # Only a version with explain endpoints pays for the wrapper.
        explains = on_explain is not None and any(
            ep.explanation is not None for ep in self.endpoints.values())
        self._batcher = Batcher(timed if explains else self.runtime.run, self.policy,
                                self.runtime.slots + 1,
                                on_batch=batched, on_depth=on_depth, on_dedup=on_dedup)
        self._batcher.start()

    async def infer(self, endpoint: Endpoint, inputs: dict[str, np.ndarray],
                    outputs: Sequence[str], deadline: float | None, json: bool = False
                    ) -> tuple[dict[str, np.ndarray], Timeline]:
        """Check a request, queue it, and return its outputs and when it passed each stage.
        `json`: its outputs go back as JSON numbers (bigger than their bytes).

        Everything before the first await runs at once: a request that found this version
        is queued before anything can close it, so a swap never fails it."""
        if self._batcher is None:
            raise NotReady(f"model {self.name!r} version {self.version} is not started")
        prepared = self.prepare(endpoint, inputs, outputs, json)
        explanation = endpoint.explanation
        return await self._batcher.submit(endpoint.source, prepared.feeds, prepared.outputs,
                                          deadline, explanation.row_cost if explanation else 1)

    async def close(self, grace: float) -> None:
        """Stop taking requests, finish the ones held (within `grace` seconds), free."""
        if self._batcher is not None:
            await self._batcher.close(grace)
        self.release()

    def release(self) -> None:
        """Free the compute threads and forget the version's own code modules."""
        self.runtime.close()
        forget_model_code(self._code_modules)
        return_freed_memory()

    def warm_up(self, shared_passes: bool) -> None:
        """Compile every endpoint's function (and the shared pass of endpoints with the
        same inputs) before the model reports ready, so no request pays a trace."""
        by_source: dict[Hashable, set[str]] = {}
        for ep in list(self.endpoints.values()):
            outputs = tuple(s.name for s in ep.outputs)
            try:
                self.runtime.warm_up(ep.source, outputs)
            except ConfigError as exc:  # an explanation with no gradient: its trace says so
                if ep.explanation is None or ep.name == self.default_endpoint:
                    raise
                log.error("%s", exc)
                self.refused[ep.name] = str(exc)
                del self.endpoints[ep.name]
                continue
            by_source.setdefault(ep.source, set()).update(outputs)
        for source, asked in by_source.items():
            if shared_passes and len(asked) > 1:
                union = tuple(sorted(asked))
                rows = {o: np.array([True, i % 2 == 0]) for i, o in enumerate(union)}
                self.runtime.warm_up(source, union, rows)

    def endpoint(self, name: str | None) -> Endpoint:
        name = name or self.default_endpoint
        if name in self.refused:
            raise NotFound(f"endpoint {self.name}.{name} was refused at load: "
                           f"{self.refused[name]}")
        if name not in self.endpoints:
            raise NotFound(f"model {self.name!r} has no endpoint {name!r}; "
                           f"endpoints: {', '.join(self.endpoints)}")
        return self.endpoints[name]

    def metadata(self, endpoint: str | None, versions: tuple[int, ...]) -> EndpointMetadata:
        """An endpoint's metadata, listing the model's `versions` that serve."""
        ep = self.endpoint(endpoint)
        return EndpointMetadata(self.name, ep.name, versions, self.platform,
                                ep.inputs, ep.outputs,
                                frozenset() if ep.explanation is None else frozenset({TARGET}))

    def prepare(self, ep: Endpoint, inputs: dict[str, np.ndarray],
                outputs: Sequence[str], json: bool = False) -> Prepared:
        """Check a request's inputs and asked-for outputs against endpoint `ep`."""
        for name in outputs:
            if name not in ep.askable:
                raise NotFound(f"endpoint {self.name}.{ep.name} has no output {clip(name)}: "
                               f"{ep.taps_hint}; {suggest(name[:100], ep.askable)}")
        explanation = ep.explanation
        target = None
        if explanation is not None and TARGET in inputs:
            inputs = dict(inputs)
            target = inputs.pop(TARGET)
        expected = ep.inputs_by_name
        # Names cut to 100 characters: a megabyte of name is not echoed back.
        unknown = [n[:99] + "…" if len(n) > 100 else n for n in sorted(set(inputs) - set(expected))]
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise InvalidInput(
                f"endpoint {self.name}.{ep.name} takes inputs "
                + ", ".join(("" if s.name in expected else "optional ") + s.describe()
                            for s in ep.inputs)
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {unknown}" if unknown else ""))
        rows = {name: _check_input(expected[name], array) for name, array in inputs.items()}
        if len(set(rows.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {rows}")
        count = next(iter(rows.values()))
        if explanation is not None:  # every row gets a target: requests with and without
            # one batch together
            inputs = {**inputs, TARGET: targets(explanation, target, count)}
        asked = tuple(outputs) or tuple(s.name for s in ep.outputs)
        self._check_response_size(ep, asked, count, json)
        return Prepared(ep, asked, inputs, count)

    def _check_response_size(self, ep: Endpoint, outputs: Sequence[str], rows: int,
                             json: bool) -> None:
        """Refuse a request whose response would pass max_response_bytes, before it is
        computed (a wide tap of many rows once took gigabytes, then failed at send; as
        JSON, 3.2 times the limit). Counted as sent: raw bytes (a string's 4-byte length
        prefix and 1 byte) or, as JSON, JSON_ELEMENT_BYTES an element, and the framing.
        Unknown dimensions count as 1: a floor of the elements."""
        per_row = sum(self._bytes_per_row(ep, name, json) for name in outputs)
        framing = FRAMING_BYTES + sum(FRAMING_BYTES_PER_OUTPUT + len(n) for n in outputs)
        total = rows * per_row + framing
        if total > self.max_response_bytes:
            fit = max(1, (self.max_response_bytes - framing) // max(per_row, 1))
            raise InvalidInput(
                f"the outputs asked for would take about {total} bytes"
                f"{' as JSON' if json else ''} for {rows} rows, over the server's limit of "
                f"{self.max_response_bytes} bytes per response: send at most {fit} rows per "
                "request, or ask for fewer outputs" + (", or binary outputs" if json else ""))

    def _bytes_per_row(self, ep: Endpoint, name: str, json: bool) -> int:
        key = (ep.name, name, json)  # signatures may share output names: per endpoint
        if key not in self._row_bytes:  # bounded: endpoints x what they may be asked x 2
            spec = next((s for s in ep.outputs if s.name == name), None) or \
                self.runtime.spec(name)
            if json:
                item = JSON_ELEMENT_BYTES.get(spec.dtype, JSON_ELEMENT_BYTES["float64"])
            else:
                item = 5 if spec.dtype == STRING else np.dtype(spec.dtype).itemsize
            self._row_bytes[key] = math.prod(d or 1 for d in spec.shape[1:]) * item
        return self._row_bytes[key]


def return_freed_memory() -> None:
    """Hand the heap an unloaded version freed back to the system. glibc keeps freed
    memory for reuse, and XLA's compiled programs leave it fragmented: without this a
    server on jax that loads and unloads versions grew by ~3 MiB a cycle. (No-op where
    the C library has no malloc_trim.)"""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _check_input(spec: TensorSpec, array: np.ndarray) -> int:
    """The rows of one input, after checking its dtype and shape against the spec."""
    dtype = STRING if array.dtype == object else array.dtype.name
    if dtype != spec.dtype:
        raise InvalidInput(f"input {spec.name!r} must be {spec.dtype}, got {dtype}; "
                           f"expected {spec.describe()}")
    shape = array.shape
    if not spec.fits(shape):
        raise InvalidInput(f"input {spec.name!r} has shape {list(shape)}; "
                           f"expected {spec.describe()} (-1: any size)")
    if shape[0] == 0:
        raise InvalidInput(f"input {spec.name!r} has no rows: send at least one")
    rows: int = shape[0]
    return rows
