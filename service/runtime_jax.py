"""Executes a Keras model's graph on JAX: cuts compiled ahead of time by XLA, per shape.

Imported only on the jax backend (service/backends.py). Each cut (inputs, outputs) is a
pure function of (the model's variable values, the feeds), replayed under
`keras.StatelessScope` as Keras's own JAX trainer does: the weights are arguments, placed
once per device, never constants baked into every executable.

XLA compiles per input shape, so a batch is padded to the next size of a small ladder
(powers of two up to max_batch_size, and max_batch_size itself) and warm-up compiles every
size of the ladder for every endpoint and shared pass before the version serves: no batch
size compiles on the request path. A non-batch shape not seen yet (a sequence's length)
does, within a budget (TRACE_BUDGET per TRACE_INTERVAL_S), as TensorFlow's traces are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any, cast

import jax
import keras
import numpy as np

from service.backends import refuse_tensorflow_only
from service.errors import InvalidInput, Overloaded
from service.explain import TARGET_SPEC, Explanation
from service.explain_jax import JaxExplainer, abstract, shapes, stateless, x32
from service.graph import TapGraph
from service.runtime import TRACE_BUDGET, TRACE_INTERVAL_S, Arrays, CompiledStore, Runtime, zeros
from service.settings import available_cpus
from service.types import Batch, TensorSpec

log = logging.getLogger(__name__)

# A compiled executable: (variable values, feeds) -> arrays by output name.
Executable = Callable[[list[jax.Array], dict[str, np.ndarray]], dict[str, jax.Array]]
# (inputs, sorted outputs, each input's (name, row shape, dtype), padded rows, device).
ExecKey = tuple[tuple[str, ...], tuple[str, ...],
                tuple[tuple[str, tuple[int, ...], str], ...], int, str]


def configure_jax(gpu_memory_limit_mb: int | None) -> list[str]:
    """The devices models run on: every GPU JAX sees, else the CPU. (Memory settings are
    environment variables read before JAX starts: see backends.select.)"""
    gpus = _gpus()
    devices = [f"/GPU:{i}" for i in range(len(gpus))] or ["/CPU:0"]
    found = "" if gpus else "no GPU found, models run on the CPU; "
    log.info("%sdevices: %s (jax %s%s)", found, ", ".join(devices), jax.__version__,
             f"; each GPU capped at {gpu_memory_limit_mb} MB" if gpus and gpu_memory_limit_mb
             else "")
    return devices


def _gpus() -> list[jax.Device]:
    try:
        return [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:  # no backend at all besides the CPU's
        return []


def gpu_memory_in_use() -> dict[str, int]:
    """Bytes JAX holds on each GPU (empty without GPUs)."""
    return {f"GPU:{i}": int((d.memory_stats() or {}).get("bytes_in_use", 0))
            for i, d in enumerate(_gpus())}


def device_of(name: str) -> jax.Device:
    """The JAX device behind a runtime's device name ("/GPU:1", "/CPU:0")."""
    kind, index = name.strip("/").split(":")
    return jax.devices("gpu" if kind == "GPU" else "cpu")[int(index)]


def ladder(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes XLA compiles for: powers of two below max_batch_size, and it."""
    limit = max(1, max_batch_size)
    return tuple(sorted({1 << k for k in range(limit.bit_length()) if 1 << k < limit}
                        | {limit}))


def rung(rows: int, sizes: Sequence[int]) -> int:
    """The padded size of a batch of `rows`: the least ladder size that holds it (a larger
    batch, which the batcher never sends, runs at its own size)."""
    return next((s for s in sizes if s >= rows), rows)


def pad(feeds: Arrays, rows: int) -> Arrays:
    """Pad to `rows` with copies of the last real row: zeros may be invalid input."""
    n = len(next(iter(feeds.values())))
    if rows == n:
        return feeds
    return {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)])
            for k, v in feeds.items()}


class JaxRuntime(Runtime):
    """A Keras model's graph on JAX; `source` is the tuple of input tap names (or an
    Explanation). The constructor matches KerasRuntime's; `jit_compile` is moot (XLA
    always compiles)."""

    def __init__(self, graph: TapGraph, devices: Sequence[str], batches_per_device: int,
                 cache_size: int = 64, jit_compile: bool = False,
                 max_batch_size: int = 32, trace_budget: int = TRACE_BUDGET) -> None:
        super().__init__(devices, batches_per_device)
        refuse_tensorflow_only(graph, graph.model.name)
        self.graph = graph
        self.max_batch_size = max_batch_size
        self.ladder = ladder(max_batch_size)
        self._variables = list(graph.model.variables)
        # The weights, placed once on each device; every executable takes them as arguments.
        self._devices = {d: device_of(d) for d in self.devices}
        self._values = {d: [jax.device_put(v.value, dev) for v in self._variables]
                        for d, dev in self._devices.items()}
        # Warm-up's and full passes pinned, the request path's compiles in an LRU, budgeted.
        self._compiled: CompiledStore[ExecKey, Executable] = CompiledStore(cache_size,
                                                                             trace_budget)
        self._functions: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
        self._explainers: dict[Explanation, JaxExplainer] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # the device the current thread computes on
        self.compiles = 0  # executables compiled, warm-up's included (tests read it)
        self._ranges = _index_ranges(graph)

    # ---- the base's hooks -----------------------------------------------------------------

    def spec(self, name: str) -> TensorSpec:
        tap = self.graph.tap(name)
        return TensorSpec(name, tap.dtype, tap.shape)

    def specs(self, source: Hashable) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        if isinstance(source, Explanation):
            return {n: self.spec(n) for n in source.inputs} | {TARGET_SPEC.name: TARGET_SPEC}, {}
        return {n: self.spec(n) for n in cast(tuple[str, ...], source)}, {}

    def _placed(self, device: str) -> AbstractContextManager[object]:
        return self._on(device)

    @contextmanager
    def _on(self, device: str) -> Any:
        self._local.device = device
        try:
            yield
        finally:
            self._local.device = None

    def _input_error(self, exc: Exception) -> str | None:
        # XLA checks no values at run time (an index out of range is clamped, not refused):
        # what reaches here is a shape the model cannot take, found while compiling it.
        if isinstance(exc, (ValueError, TypeError)) and not self._compiled.warming:
            return str(exc).strip().splitlines()[0]
        return None

    # ---- warm-up --------------------------------------------------------------------------

    def warm_up(self, source: Hashable, outputs: tuple[str, ...],
                masks: Arrays | None = None) -> None:
        """Compile every ladder size on every device (kept for good: never evicted, not
        counted against the budget), and run once, so no request pays for a compile."""
        started, before = time.perf_counter(), self.compiles
        self._compiled.warming = True
        try:
            super().warm_up(source, outputs, masks)  # runs one batch: it must compute
            inputs, _ = self.specs(source)
            cost = source.row_cost if isinstance(source, Explanation) else 1
            # An explanation's batch holds at most max_batch_size // row_cost rows.
            most = rung(max(1, self.max_batch_size // cost), self.ladder)
            sizes = [s for s in self.ladder if s <= most]
            # XLA compiles off the GIL: the sizes compile side by side.
            with ThreadPoolExecutor(max(1, min(len(sizes), available_cpus())),
                                    "compile") as pool:
                for _ in pool.map(lambda job: self._warm(source, outputs, inputs, *job),
                                  [(d, s) for d in self.devices for s in sizes]):
                    pass
        finally:
            self._compiled.warming = False
        what = (f"explain endpoint {source.endpoint!r}" if isinstance(source, Explanation)
                else f"inputs {list(cast(tuple[str, ...], source))} -> {list(outputs)}")
        log.info("compiled %d executables for %s in %.2f s (batch sizes %s)",
                 self.compiles - before, what, time.perf_counter() - started, list(self.ladder))

    def _warm(self, source: Hashable, outputs: tuple[str, ...],
              inputs: dict[str, TensorSpec], device: str, size: int) -> None:
        feeds = x32({name: zeros(spec, size) for name, spec in inputs.items()})
        if isinstance(source, Explanation):
            self._explainer(source).compile(feeds, size, device, self._devices[device],
                                            self._values[device])
        else:
            # Keyed as a request finds it: by the set of outputs, sorted.
            self._executable(cast(tuple[str, ...], source), tuple(sorted(outputs)), feeds,
                             size, device)

    # ---- compute --------------------------------------------------------------------------

    def _compute(self, batch: Batch) -> Arrays:
        device = self._local.device
        inputs = cast(tuple[str, ...], batch.source)
        n = batch.rows
        size = rung(n, self.ladder)
        _check_indices(batch.feeds, self._ranges)
        feeds = x32(pad(batch.feeds, size))
        # XLA wants static shapes: every output on every row; masks apply after.
        fn = self._for_batch(inputs, tuple(sorted(batch.outputs)), feeds, size, device)
        # numpy feeds go to the executable's device as it is called: cheaper than a
        # device_put of each first (about 40 µs a call on the CPU).
        computed = fn(self._values[device], feeds)
        result = {k: self._numpy(k, computed[k])[:n] for k in batch.outputs}
        if batch.masks is not None:
            result = {k: v[batch.masks[k]] for k, v in result.items()}
        return result

    def _numpy(self, name: str, value: jax.Array) -> np.ndarray:
        # JAX runs 64-bit types as 32-bit (jax_enable_x64 off): answer the model's dtype.
        array = np.asarray(value)
        dtype = self.spec(name).dtype
        return array if array.dtype.name == dtype else array.astype(dtype)

    def _explain(self, batch: Batch) -> Arrays:
        assert isinstance(batch.source, Explanation)
        device = self._local.device
        explainer = self._explainer(batch.source)
        _check_indices(batch.feeds, self._ranges)
        n = batch.rows
        size = rung(n, self.ladder)
        feeds = pad(batch.feeds, size)
        if not explainer.compiled(feeds, size, device) and not self._compiled.may_compile():
            raise self._over_budget(feeds)
        attribution = explainer(feeds, size, device,
                                self._values[device], self._devices[device])[:n]
        result = {explainer.output: attribution}
        if batch.masks is not None:
            result = {k: v[batch.masks[k]] for k, v in result.items()}
        return result

    def _explainer(self, explanation: Explanation) -> JaxExplainer:
        with self._lock:
            explainer = self._explainers.get(explanation)
            if explainer is None:
                explainer = JaxExplainer(self.graph, explanation, self._variables,
                                         self.max_batch_size, self._counted)
                self._explainers[explanation] = explainer
            return explainer

    def _counted(self) -> None:
        with self._lock:
            self.compiles += 1

    def _for_batch(self, inputs: tuple[str, ...], outputs: tuple[str, ...], feeds: Arrays,
                   size: int, device: str) -> Executable:
        """The executable for this batch: its own cut's, compiled if the budget allows;
        past the budget, the inputs' full pass at this shape (every tap; compiled once and
        kept) when the shape is one already compiled for; else RESOURCE_EXHAUSTED."""
        key = _key(inputs, outputs, feeds, size, device)
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        if self._compiled.may_compile():
            return self._executable(inputs, outputs, feeds, size, device)
        full = tuple(sorted(self.graph.computable(inputs)))
        full_key = _key(inputs, full, feeds, size, device)
        fn = self._compiled.pinned(full_key)
        known = any(k[0] == inputs and k[2] == key[2] for k in self._compiled.held())
        if fn is not None:
            return fn
        if known:
            log.warning("the compile budget of %d per %d s is spent: compiling the full pass "
                        "of inputs %s at %d rows, which serves taps asked from now on",
                        self._compiled.budget, TRACE_INTERVAL_S, list(inputs), size)
            return self._executable(inputs, full, feeds, size, device, pin=True)
        raise self._over_budget(feeds)

    def _over_budget(self, feeds: Arrays) -> Overloaded:
        shapes = ", ".join(f"{n} {list(a.shape[1:])}" for n, a in sorted(feeds.items()))
        return Overloaded(f"inputs of shapes {shapes} need a new compiled program, and this "
                          f"model's budget of {self._compiled.budget} compiles per "
                          f"{TRACE_INTERVAL_S} s on the request path is spent: retry later, "
                          "or send shapes already served")

    def _executable(self, inputs: tuple[str, ...], outputs: tuple[str, ...], feeds: Arrays,
                    size: int, device: str, pin: bool = False) -> Executable:
        """Compile the cut for these feeds' shapes on `device`, and keep it (warm-up's and
        `pin`'s for good; others in the LRU of compiled_cache_size executables)."""
        key = _key(inputs, outputs, feeds, size, device)
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        dev = self._devices[device]
        placeholders = {k: abstract(v.shape, v.dtype, dev) for k, v in feeds.items()}
        compiled = cast(Executable, jax.jit(self._function(inputs, outputs)).lower(
            self._values[device], placeholders).compile())
        with self._lock:
            self.compiles += 1
        return self._compiled.put(key, compiled, pin)

    def _function(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
        """The cut as a pure function of (variable values, feeds)."""
        with self._lock:
            fn = self._functions.get((inputs, outputs))
        if fn is not None:
            return fn
        plan = self.graph.plan(inputs, outputs)
        variables = self._variables

        def run(values: list[jax.Array], feeds: dict[str, jax.Array]) -> dict[str, jax.Array]:
            out = stateless(variables, values, plan, feeds)
            return {name: out[name] for name in outputs}

        with self._lock:
            return self._functions.setdefault((inputs, outputs), run)

    def close(self) -> None:
        """Finish the batches in hand, then drop the executables and the weights on each
        device: an unloaded version's compiled programs go with it."""
        super().close()
        self._compiled.clear()
        with self._lock:
            self._functions.clear()
            self._explainers.clear()
            self._values.clear()

    def cached_executables(self) -> int:
        """Executables in the LRU (warm-up's not counted)."""
        return len(self._compiled.cached())


def _index_ranges(graph: TapGraph) -> dict[str, int]:
    """The inputs that feed an Embedding directly, and its input_dim."""
    names = {tap.key: name for name, tap in graph.taps.items()
             if tap.layer == "InputLayer" and name in graph.input_names}
    return {names[step.input_keys[0]]: int(step.node.operation.input_dim)
            for step in graph.steps
            if isinstance(step.node.operation, keras.layers.Embedding)
            and step.input_keys and step.input_keys[0] in names}


def _check_indices(feeds: Arrays, ranges: dict[str, int]) -> None:
    """XLA clamps or fills an index out of range where TensorFlow refuses it: refuse it
    here, in TensorFlow's words, rather than answer a made-up row."""
    for name, limit in ranges.items():
        values = feeds.get(name)
        if values is None or not values.size:
            continue
        bad = np.argwhere((values < 0) | (values >= limit))
        if len(bad):
            at = ",".join(str(int(i)) for i in bad[0])
            raise InvalidInput(f"the model cannot compute this input: indices[{at}] = "
                               f"{values[tuple(bad[0])]} is not in [0, {limit}) (input "
                               f"{name!r} feeds an Embedding of {limit} rows)")


def _key(inputs: tuple[str, ...], outputs: tuple[str, ...], feeds: Arrays, size: int,
         device: str) -> ExecKey:
    return inputs, outputs, shapes(feeds), size, device
