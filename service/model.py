"""One served model version: its endpoints, the checks a request must pass for one, and
its batcher. Its life: start → infer … → close (stop taking work, finish it, free it)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from service.batcher import Batcher, BatchPolicy
from service.errors import InvalidInput, NotFound, NotReady, clip
from service.modelcode import forget_model_code
from service.repository import ModelSource
from service.runtime import Runtime
from service.statistics import VersionStatistics
from service.types import STRING, EndpointMetadata, TensorSpec
from service.validation import suggest

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "default"
# The most bytes of outputs one request may ask for, unless the loader sets the server's.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    """One servable cut of a model: fixed inputs, default outputs, what else may be asked."""

    name: str
    source: Hashable  # what the runtime computes from: input tap names, or a signature
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    askable: frozenset[str]  # outputs a request may name (its outputs, plus taps if allowed)
    taps_hint: str  # why a name outside `askable` cannot be asked for

    @cached_property
    def inputs_by_name(self) -> Mapping[str, TensorSpec]:
        """The inputs by name (built once: every request looks its inputs up in it)."""
        return {s.name: s for s in self.inputs}


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
                 default_endpoint: str, platform: str, code_modules: Sequence[str] = ()) -> None:
        self.name = source.name
        self.version = source.version
        self.source = source
        self.runtime = runtime
        self.endpoints = endpoints
        self.default_endpoint = default_endpoint
        self.platform = platform
        self.policy = BatchPolicy()
        self.max_response_bytes = MAX_RESPONSE_BYTES
        self._code_modules = list(code_modules)
        self._batcher: Batcher | None = None
        self._row_bytes: dict[tuple[str, str], int] = {}  # an output's bytes per row, a floor
        self.stats = VersionStatistics()

    def start(self, on_batch: Callable[[int, float], None] | None = None,
              on_depth: Callable[[int], None] | None = None,
              on_dedup: Callable[[int], None] | None = None) -> None:
        """Start batching (inside the running event loop)."""
        # One batch more than the compute threads: it waits in the runtime's executor, so a
        # thread that finishes starts the next batch at once, not after an event-loop turn.
        def batched(rows: int, seconds: float) -> None:
            self.stats.batch(rows, seconds)
            if on_batch:
                on_batch(rows, seconds)

        self._batcher = Batcher(self.runtime.run, self.policy, self.runtime.slots + 1,
                                on_batch=batched, on_depth=on_depth, on_dedup=on_dedup)
        self._batcher.start()

    async def infer(self, endpoint: Endpoint, inputs: dict[str, np.ndarray],
                    outputs: Sequence[str], deadline: float | None
                    ) -> tuple[dict[str, np.ndarray], float]:
        """Check a request, queue it, and return its outputs and the seconds it queued.

        Everything before the first await runs at once: a request that found this version
        is queued before anything can close it, so a swap never fails it."""
        if self._batcher is None:
            raise NotReady(f"model {self.name!r} version {self.version} is not started")
        prepared = self.prepare(endpoint, inputs, outputs)
        return await self._batcher.submit(endpoint.source, prepared.feeds, prepared.outputs,
                                          deadline)

    async def close(self, grace: float) -> None:
        """Stop taking requests, finish the ones held (within `grace` seconds), free."""
        if self._batcher is not None:
            await self._batcher.close(grace)
        self.release()

    def release(self) -> None:
        """Free the compute threads and forget the version's own code modules."""
        self.runtime.close()
        forget_model_code(self._code_modules)

    def warm_up(self, shared_passes: bool) -> None:
        """Compile every endpoint's function (and the shared pass of endpoints with the
        same inputs) before the model reports ready, so no request pays a trace."""
        by_source: dict[Hashable, set[str]] = {}
        for ep in self.endpoints.values():
            outputs = tuple(s.name for s in ep.outputs)
            self.runtime.warm_up(ep.source, outputs)
            by_source.setdefault(ep.source, set()).update(outputs)
        for source, outputs in by_source.items():
            if shared_passes and len(outputs) > 1:
                union = tuple(sorted(outputs))
                rows = {o: np.array([True, i % 2 == 0]) for i, o in enumerate(union)}
                self.runtime.warm_up(source, union, rows)

    def endpoint(self, name: str | None) -> Endpoint:
        name = name or self.default_endpoint
        if name not in self.endpoints:
            raise NotFound(f"model {self.name!r} has no endpoint {name!r}; "
                           f"endpoints: {', '.join(self.endpoints)}")
        return self.endpoints[name]

    def metadata(self, endpoint: str | None, versions: tuple[int, ...]) -> EndpointMetadata:
        """An endpoint's metadata, listing the model's `versions` that serve."""
        ep = self.endpoint(endpoint)
        return EndpointMetadata(self.name, ep.name, versions, self.platform,
                                ep.inputs, ep.outputs)

    def prepare(self, ep: Endpoint, inputs: dict[str, np.ndarray],
                outputs: Sequence[str]) -> Prepared:
        """Check a request's inputs and asked-for outputs against endpoint `ep`."""
        for name in outputs:
            if name not in ep.askable:
                raise NotFound(f"endpoint {self.name}.{ep.name} has no output {clip(name)}: "
                               f"{ep.taps_hint}; {suggest(name[:100], ep.askable)}")
        expected = ep.inputs_by_name
        # Names cut to 100 characters: a megabyte of name is not echoed back.
        unknown = [n[:99] + "…" if len(n) > 100 else n for n in sorted(set(inputs) - set(expected))]
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise InvalidInput(
                f"endpoint {self.name}.{ep.name} takes inputs "
                f"{', '.join(_describe(s) for s in ep.inputs)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {unknown}" if unknown else ""))
        rows = {name: _check_input(expected[name], array) for name, array in inputs.items()}
        if len(set(rows.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {rows}")
        count = next(iter(rows.values()))
        asked = tuple(outputs) or tuple(s.name for s in ep.outputs)
        self._check_response_size(ep, asked, count)
        return Prepared(ep, asked, inputs, count)

    def _check_response_size(self, ep: Endpoint, outputs: Sequence[str], rows: int) -> None:
        """Refuse a request whose outputs would pass max_response_bytes, before it is
        computed (a wide tap of many rows once took gigabytes, then failed at send).
        Unknown dimensions count as 1 and strings as 1 byte: a floor, never a refusal of
        what fits."""
        total = rows * sum(self._bytes_per_row(ep, name) for name in outputs)
        if total > self.max_response_bytes:
            raise InvalidInput(
                f"the outputs asked for would take about {total} bytes for {rows} rows, over "
                f"the server's limit of {self.max_response_bytes} bytes per response: send "
                f"at most {max(1, rows * self.max_response_bytes // total)} rows per request, "
                "or ask for fewer outputs")

    def _bytes_per_row(self, ep: Endpoint, name: str) -> int:
        key = (ep.name, name)  # signatures may share output names: per endpoint
        if key not in self._row_bytes:  # bounded: endpoints x what they may be asked
            spec = next((s for s in ep.outputs if s.name == name), None) or \
                self.runtime.spec(name)
            item = 1 if spec.dtype == STRING else np.dtype(spec.dtype).itemsize
            self._row_bytes[key] = math.prod(d or 1 for d in spec.shape[1:]) * item
        return self._row_bytes[key]


def _describe(spec: TensorSpec) -> str:
    dims = ",".join("-1" if d is None else str(d) for d in spec.shape)
    return f"{spec.name} ({spec.dtype} [{dims}])"


def _check_input(spec: TensorSpec, array: np.ndarray) -> int:
    """The rows of one input, after checking its dtype and shape against the spec."""
    dtype = STRING if array.dtype == object else array.dtype.name
    if dtype != spec.dtype:
        raise InvalidInput(f"input {spec.name!r} must be {spec.dtype}, got {dtype}; "
                           f"expected {_describe(spec)}")
    shape = array.shape
    fits = len(shape) == len(spec.shape) and all(
        want in (None, got) for want, got in zip(spec.shape, shape, strict=True))
    if not fits:
        raise InvalidInput(f"input {spec.name!r} has shape {list(shape)}; "
                           f"expected {_describe(spec)} (-1: any size)")
    if shape[0] == 0:
        raise InvalidInput(f"input {spec.name!r} has no rows: send at least one")
    return shape[0]
