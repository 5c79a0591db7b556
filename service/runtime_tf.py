"""Executes a loaded model on TensorFlow: tf.functions, devices, SavedModels.

Imported only on the TensorFlow backend (service/backends.py): every TensorFlow-specific
line of the runtime lives here, beside the backend-free base in service/runtime.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import cast

import numpy as np
import tensorflow as tf

from service.errors import ConfigError
from service.explain import TARGET_SPEC, Explanation
from service.explain_tf import Explainers
from service.graph import TapGraph
from service.runtime import TRACE_BUDGET, TRACE_INTERVAL_S, Arrays, CompiledStore, Runtime, pad_rows
from service.savedmodel_ops import disallowed_ops
from service.types import STRING, Batch, TensorSpec

log = logging.getLogger(__name__)

# A compiled cut of a model (feeds, and row masks if masked, in; tensors by output out),
# kept under (inputs, outputs, masked, jit).
Compiled = Callable[..., dict[str, tf.Tensor]]
CutKey = tuple[tuple[str, ...], tuple[str, ...], bool, bool]
# Input shapes (beside the batch size) XLA compiles for, per model; others run without XLA.
XLA_SHAPES = 8


def configure_tensorflow(intra_op_threads: int, inter_op_threads: int,
                         gpu_memory_limit_mb: int | None) -> list[str]:
    """Set process-wide TensorFlow options (once, before any op runs); return devices.

    GPUs get memory growth, so a server does not grab the whole card at start.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError:  # a second server in one process: TensorFlow already started
        log.warning("TensorFlow already started: its threading is left as it is")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            if gpu_memory_limit_mb:
                tf.config.set_logical_device_configuration(gpu, [
                    tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit_mb)])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            log.warning("TensorFlow already started: memory settings of %s unchanged", gpu.name)
    devices = [f"/GPU:{i}" for i in range(len(gpus))] or ["/CPU:0"]
    # TensorFlow's own words for this (`failed call to cuInit`) are quieted (service/logs).
    found = "" if gpus else "no GPU found, models run on the CPU; "
    log.info("%sdevices: %s; TensorFlow threads: intra-op %d, inter-op %d", found,
             ", ".join(devices), intra_op_threads, inter_op_threads)
    return devices


def gpu_memory_in_use() -> dict[str, int]:
    """Bytes TensorFlow holds on each GPU (empty without GPUs)."""
    return {f"GPU:{i}": tf.config.experimental.get_memory_info(f"GPU:{i}")["current"]
            for i in range(len(tf.config.list_physical_devices("GPU")))}


def _reason(exc: tf.errors.OpError) -> str:
    """TensorFlow's own sentence from an op error, without its traceback of graph frames."""
    message: str = exc.message
    lines = [line.strip() for line in message.splitlines()]
    said = [line for line in lines if line and not line.startswith(
        ("File ", "[[", "Detected at node", "Graph execution error"))]
    node = next((line.split()[3] for line in lines if line.startswith("Detected at node")), "")
    return (said[-1] if said else lines[0]) + (f" (at {node})" if node else "")


class _TensorFlowPlacement:
    """The TensorFlow runtimes' hooks into the base: tf.device, tf.errors."""

    def _placed(self, device: str) -> AbstractContextManager[object]:
        return cast(AbstractContextManager[object], tf.device(device))

    def _input_error(self, exc: Exception) -> str | None:
        return _reason(exc) if isinstance(exc, tf.errors.InvalidArgumentError) else None


class KerasRuntime(_TensorFlowPlacement, Runtime):
    """A Keras model's graph, cut by (inputs, outputs) into cached `tf.function`s.

    `source` is the tuple of input tap names. Each function has an input signature
    with a None batch dimension, so it traces once for every batch size.

    A trace holds the GIL (0.1 s for a small model, seconds for a deep one), stalling every
    request of the server, so tracing on the request path is budgeted: past `trace_budget`
    traces in TRACE_INTERVAL_S, a batch asking outputs not yet compiled runs its inputs'
    full pass (every tap, compiled once), the outputs it did not ask for on one row each.
    """

    def __init__(self, graph: TapGraph, devices: Sequence[str], batches_per_device: int,
                 cache_size: int = 64, jit_compile: bool = False,
                 max_batch_size: int = 32, trace_budget: int = TRACE_BUDGET,
                 xla_shapes: int = XLA_SHAPES) -> None:
        super().__init__(devices, batches_per_device)
        self.graph = graph
        self.jit_compile = jit_compile
        self.max_batch_size = max_batch_size
        # Warm-up's and full passes pinned, the request path's traces in an LRU, budgeted.
        self._compiled: CompiledStore[CutKey, Compiled] = CompiledStore(cache_size, trace_budget)
        self._no_full_pass: set[CutKey] = set()
        # The inputs' non-batch shapes XLA compiles for.
        self._xla_shapes: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()
        self._xla_limit = xla_shapes
        self._lock = threading.Lock()
        self._explainers = Explainers(graph, max_batch_size)

    def spec(self, name: str) -> TensorSpec:
        tap = self.graph.tap(name)
        return TensorSpec(name, tap.dtype, tap.shape)

    def specs(self, source: Hashable) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        if isinstance(source, Explanation):
            return {n: self.spec(n) for n in source.inputs} | {TARGET_SPEC.name: TARGET_SPEC}, {}
        # Otherwise a Keras model's source is its endpoint's input names.
        return {n: self.spec(n) for n in cast(tuple[str, ...], source)}, {}

    def _explain(self, batch: Batch) -> Arrays:
        assert isinstance(batch.source, Explanation)
        result = self._explainers(batch.source, batch.feeds)
        if batch.masks is not None:  # an explain endpoint answers one output: masks are rare
            result = {k: v[batch.masks[k]] for k, v in result.items()}
        return result

    def warm_up(self, source: Hashable, outputs: tuple[str, ...],
                masks: Arrays | None = None) -> None:
        # What warm-up compiles stays compiled and is not counted against the budget: a
        # client cycling taps must not evict the endpoints' own functions.
        self._compiled.warming = True
        try:
            super().warm_up(source, outputs, masks)
        finally:
            self._compiled.warming = False

    def function(self, inputs: tuple[str, ...], outputs: Iterable[str], masked: bool,
                 jit: bool | None = None) -> Compiled:
        """The compiled function for this cut, built once and kept (LRU-bounded, keyed by
        the set of outputs). `jit`: compiled by XLA (default: the model's jit_compile)."""
        key = (inputs, tuple(sorted(outputs)), masked, self.jit_compile if jit is None else jit)
        fn = self._compiled.get(key)
        return self._trace(key) if fn is None else fn

    def _trace(self, key: CutKey) -> Compiled:
        return self._compiled.put(key, self._build(*key))

    def _full_pass(self, inputs: tuple[str, ...], masked: bool,
                   jit: bool) -> tuple[Compiled, tuple[str, ...]] | None:
        """Every tap computable from `inputs` in one function, traced once and kept; None
        if this graph's taps do not make one function (then cuts are traced as asked)."""
        outputs = tuple(sorted(self.graph.computable(inputs)))
        key = (inputs, outputs, masked, jit)
        with self._lock:
            if key in self._no_full_pass:
                return None
        fn = self._compiled.pinned(key)
        if fn is None:
            log.warning("the trace budget of %d per %d s is spent: compiling the full pass of "
                        "inputs %s, which serves taps asked from now on", self._compiled.budget,
                        TRACE_INTERVAL_S, list(inputs))
            try:
                fn = self._build(inputs, outputs, masked, jit)
            except Exception:
                log.exception("the full pass of inputs %s does not compile", list(inputs))
                with self._lock:
                    self._no_full_pass.add(key)
                return None
            fn = self._compiled.put(key, fn, pin=True)
        return fn, outputs

    def _build(self, inputs: tuple[str, ...], outputs: tuple[str, ...], masked: bool,
               jit: bool | None = None) -> Compiled:
        """Trace the cut (jit: compiled by XLA; default: the model's jit_compile)."""
        jit = self.jit_compile if jit is None else jit
        plan = self.graph.plan(inputs, outputs)
        feed_sig = {n: tf.TensorSpec((None, *self.spec(n).shape[1:]),
                                     tf.string if self.spec(n).dtype == STRING
                                     else self.spec(n).dtype, name=None)
                    for n in inputs}
        if masked:
            masks_sig = {o: tf.TensorSpec((None,), tf.bool) for o in outputs}

            @tf.function(input_signature=[feed_sig, masks_sig])  # type: ignore[untyped-decorator]  # TF ships no types
            def run_masked(feeds: dict[str, tf.Tensor],
                           masks: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
                return plan(feeds, masks, tf.boolean_mask)

            masked_fn: Compiled = run_masked.get_concrete_function()
            return masked_fn

        @tf.function(input_signature=[feed_sig], jit_compile=jit or None)  # type: ignore[untyped-decorator]  # TF ships no types
        def run(feeds: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return plan(feeds)

        # The concrete function skips tf.function's dispatch: ~100 µs less per call.
        fn: Compiled = run.get_concrete_function()
        return fn

    def _compute(self, batch: Batch) -> Arrays:
        feeds, masks = batch.feeds, batch.masks
        n = len(next(iter(feeds.values())))
        jit = self.jit_compile and self._xla_admits(feeds)
        # XLA wants static shapes: it computes every output on every (padded) row.
        masked = masks is not None and not jit
        key: CutKey = (_inputs(batch), tuple(sorted(batch.outputs)), masked, jit)
        fn = self._compiled.get(key)
        if fn is None and not self._compiled.may_compile():  # past the trace budget: a wider pass
            wider = self._over_budget(batch, jit)
            if wider is not None:
                fn, masked, masks = wider
        if fn is None:
            fn = self._trace(key)
        padded = pad_rows(n, self.max_batch_size) if jit else n
        if padded != n:  # pad with copies of a real row: zeros may be invalid input
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], padded - n, axis=0)])
                     for k, v in feeds.items()}
        computed = fn(feeds, masks) if masked else fn(feeds)
        result = {k: _to_numpy(computed[k]) for k in batch.outputs}
        if not masked:
            result = {k: v[:n] if batch.masks is None else v[:n][batch.masks[k]]
                      for k, v in result.items()}
        return result

    def _xla_admits(self, feeds: Arrays) -> bool:
        """Whether XLA runs inputs of these non-batch shapes: it compiles a program per
        shape (~90 ms, and memory kept for good), so a dynamic axis (a sequence's length)
        gets XLA for its first `xla_shapes` shapes, and other shapes run without it.
        (Padding the axis to a few lengths, as the batch is padded, would change what
        most models compute: an LSTM's last state, a mean over the sequence.)"""
        shape = tuple((name, a.shape[1:]) for name, a in sorted(feeds.items()))
        with self._lock:
            if shape not in self._xla_shapes and len(self._xla_shapes) < self._xla_limit:
                self._xla_shapes.add(shape)
            return shape in self._xla_shapes

    def _over_budget(self, batch: Batch,
                     jit: bool) -> tuple[Compiled, bool, Arrays | None] | None:
        """The function, masking and masks that run `batch` without a trace of its own:
        the full pass, each output not asked for on one row (all rows under XLA)."""
        masked = not jit
        full = self._full_pass(_inputs(batch), masked, jit)
        if full is None:
            return None
        fn, outputs = full
        if not masked:
            return fn, False, batch.masks
        one = np.zeros(batch.rows, dtype=bool)
        one[0] = True
        every = np.ones(batch.rows, dtype=bool)
        asked = batch.masks or dict.fromkeys(batch.outputs, every)
        return fn, True, {o: asked.get(o, one) for o in outputs}


def _inputs(batch: Batch) -> tuple[str, ...]:
    """A Keras model's batch: its source is its endpoint's input names."""
    return cast(tuple[str, ...], batch.source)


def _to_numpy(t: tf.Tensor) -> np.ndarray:
    # np.asarray is a zero-copy view of a CPU tensor; strings need .numpy().
    return t.numpy() if t.dtype == tf.string else np.asarray(t)


def _spec_of(name: str, spec: tf.TensorSpec) -> TensorSpec:
    dtype = STRING if spec.dtype == tf.string else spec.dtype.name
    return TensorSpec(name, dtype, tuple(spec.shape.as_list()))


class SavedModelRuntime(_TensorFlowPlacement, Runtime):
    """A SavedModel's signatures; `source` is the signature name. No graph, so no taps."""

    def __init__(self, path: Path, devices: Sequence[str], batches_per_device: int,
                 allow_file_ops: bool = False) -> None:
        super().__init__(devices, batches_per_device)
        found = [] if allow_file_ops else disallowed_ops(path)
        if found:
            raise ConfigError(
                f"the SavedModel would run ops outside the server's allow-list {found}: "
                "ordinary models' arithmetic is allowed, not ops that may read, write or list "
                "the server's files; set `allow_file_ops: true` in its config.yaml if you "
                "trust it",
                category="refused: its graph runs ops outside the allow-list (allow_file_ops)")
        try:
            self._loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # TF raises many types for a broken folder
            raise ConfigError(f"{path}: cannot load SavedModel: {exc}") from exc
        self.signatures = dict(self._loaded.signatures)
        if not self.signatures:
            raise ConfigError(f"{path}: the SavedModel has no signatures to serve")

    def specs(self, source: Hashable) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        fn = self.signatures[source]
        inputs = fn.structured_input_signature[1]
        return ({n: _spec_of(n, s) for n, s in sorted(inputs.items())},
                {n: _spec_of(n, s) for n, s in fn.structured_outputs.items()})

    def _compute(self, batch: Batch) -> Arrays:
        # A signature computes all its outputs; keep the asked-for ones.
        result = self.signatures[batch.source](
            **{k: tf.constant(v) for k, v in batch.feeds.items()})
        return {name: _to_numpy(result[name]) if batch.masks is None
                else _to_numpy(result[name])[batch.masks[name]] for name in batch.outputs}
