"""Executes a loaded model on TensorFlow: compiled functions, devices, threads.

Every TensorFlow-specific line of the server lives here, so another Keras backend
could stand in by providing the same `Runtime` shape. Compute runs on executor
threads this module owns, never on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from service.errors import ConfigError, InvalidInput
from service.graph import TapGraph
from service.types import STRING, Batch, TensorSpec

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


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
    lines = [line.strip() for line in exc.message.splitlines()]
    said = [line for line in lines if line and not line.startswith(
        ("File ", "[[", "Detected at node", "Graph execution error"))]
    node = next((line.split()[3] for line in lines if line.startswith("Detected at node")), "")
    return (said[-1] if said else lines[0]) + (f" (at {node})" if node else "")


def _zeros(spec: TensorSpec, rows: int) -> np.ndarray:
    shape = (rows, *(d or 1 for d in spec.shape[1:]))
    if spec.dtype == STRING:
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=spec.dtype)


def _pad_rows(rows: int, limit: int) -> int:
    """The padded batch size under XLA: the next power of two, so few shapes compile."""
    return min(1 << max(rows - 1, 0).bit_length(), max(limit, rows))


class Runtime:
    """Runs batches of one model: picks a device, runs off the loop, returns numpy.

    Subclasses provide `specs` and `_compute` (blocking, called on an executor thread).
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

    def _compute(self, batch: Batch) -> Arrays:
        raise NotImplementedError

    async def run(self, batch: Batch) -> tuple[Arrays, float]:
        """Compute the batch's outputs, and the seconds the device took (timed on its
        thread: not the wait for a free thread, nor for the event loop to resume). With
        masks, output o holds only masks[o]'s rows."""
        device = next(self._next_device)
        loop = asyncio.get_running_loop()
        wide = self._widen(batch)
        result, seconds = await loop.run_in_executor(self._executors[device], self._on_device,
                                                     device, wide)
        if wide is not batch:
            result = {name: result[name] for name in batch.outputs}
        return result, seconds

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

    def _on_device(self, device: str, batch: Batch) -> tuple[Arrays, float]:
        started = time.perf_counter()
        try:
            with tf.device(device):
                return self._compute(batch), time.perf_counter() - started
        except tf.errors.InvalidArgumentError as exc:  # the values, not the shapes: e.g.
            # a token outside an Embedding's vocabulary
            raise InvalidInput(f"the model cannot compute this input: {_reason(exc)}") from exc

    def warm_up(self, source: Hashable, outputs: tuple[str, ...],
                masks: Arrays | None = None) -> None:
        """Trace and run once, so no request pays for it. With masks, `outputs` is the
        shared pass of every endpoint on `source`: a batch asking any subset of it runs
        that warmed pass (see `_widen`) instead of tracing one of its own."""
        inputs, _ = self.specs(source)
        n = 2 if masks is not None else 1
        feeds = {name: _zeros(spec, n) for name, spec in inputs.items()}
        for device in self.devices:
            self._on_device(device, Batch(source, outputs, feeds, masks))
        if masks is not None:
            self._shared[source] = outputs

    def close(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=True)


class KerasRuntime(Runtime):
    """A Keras model's graph, cut by (inputs, outputs) into cached `tf.function`s.

    `source` is the tuple of input tap names. Each function has an input signature
    with a None batch dimension, so it traces once for every batch size.
    """

    def __init__(self, graph: TapGraph, devices: Sequence[str], batches_per_device: int,
                 cache_size: int = 64, jit_compile: bool = False,
                 max_batch_size: int = 32) -> None:
        super().__init__(devices, batches_per_device)
        self.graph = graph
        self.jit_compile = jit_compile
        self.max_batch_size = max_batch_size
        self._cache: OrderedDict[tuple, Callable] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def spec(self, name: str) -> TensorSpec:
        tap = self.graph.tap(name)
        return TensorSpec(name, tap.dtype, tap.shape)

    def specs(self, source: Hashable) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        return {n: self.spec(n) for n in source}, {}

    def function(self, inputs: tuple[str, ...], outputs: tuple[str, ...],
                 masked: bool) -> Callable:
        """The compiled function for this cut, built once and kept (LRU-bounded)."""
        key = (inputs, outputs, masked)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        fn = self._build(inputs, outputs, masked)
        with self._lock:
            self._cache[key] = fn
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return fn

    def _build(self, inputs: tuple[str, ...], outputs: tuple[str, ...], masked: bool) -> Callable:
        plan = self.graph.plan(inputs, outputs)
        feed_sig = {n: tf.TensorSpec((None, *self.spec(n).shape[1:]),
                                     tf.string if self.spec(n).dtype == STRING
                                     else self.spec(n).dtype, name=None)
                    for n in inputs}
        if masked:
            masks_sig = {o: tf.TensorSpec((None,), tf.bool) for o in outputs}

            @tf.function(input_signature=[feed_sig, masks_sig])
            def run_masked(feeds: dict, masks: dict) -> dict:
                return plan(feeds, masks, tf.boolean_mask)

            return run_masked.get_concrete_function()

        @tf.function(input_signature=[feed_sig], jit_compile=self.jit_compile or None)
        def run(feeds: dict) -> dict:
            return plan(feeds)

        # The concrete function skips tf.function's dispatch: ~100 µs less per call.
        return run.get_concrete_function()

    def _compute(self, batch: Batch) -> Arrays:
        feeds, masks = batch.feeds, batch.masks
        n = len(next(iter(feeds.values())))
        # XLA wants static shapes: it computes every output on every (padded) row.
        masked = masks is not None and not self.jit_compile
        padded = _pad_rows(n, self.max_batch_size) if self.jit_compile else n
        if padded != n:  # pad with copies of a real row: zeros may be invalid input
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], padded - n, axis=0)])
                     for k, v in feeds.items()}
        fn = self.function(tuple(batch.source), batch.outputs, masked)
        result = {k: _to_numpy(t) for k, t in (fn(feeds, masks) if masked else fn(feeds)).items()}
        if not masked:
            result = {k: v[:n] if masks is None else v[:n][masks[k]] for k, v in result.items()}
        return result


def _to_numpy(t: tf.Tensor) -> np.ndarray:
    # np.asarray is a zero-copy view of a CPU tensor; strings need .numpy().
    return t.numpy() if t.dtype == tf.string else np.asarray(t)


def _spec_of(name: str, spec: tf.TensorSpec) -> TensorSpec:
    dtype = STRING if spec.dtype == tf.string else spec.dtype.name
    return TensorSpec(name, dtype, tuple(spec.shape.as_list()))


# Ops a served graph has no business running: TensorFlow's `saved_model_cli scan` deny-list
# (ReadFile, WriteFile, PrintV2) and their kin that read, write or list files or run Python.
# Save/Restore are left out: every SavedModel's graph holds them for its variables.
FILE_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "PrintV2", "ImmutableConst",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2",
    "FixedLengthRecordReader", "FixedLengthRecordReaderV2", "TFRecordReader",
    "TFRecordReaderV2", "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset",
    "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2", "DatasetToTFRecord",
    "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2", "LoadDataset",
    "CreateSummaryFileWriter", "PyFunc", "PyFuncStateless", "EagerPyFunc",
})


def file_ops(path: Path) -> list[str]:
    """The FILE_OPS a SavedModel folder's graphs and functions hold, read from its
    saved_model.pb before anything of it is loaded or run."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((path / "saved_model.pb").read_bytes())
    found: set[str] = set()
    for meta in saved.meta_graphs:
        found.update(n.op for n in meta.graph_def.node if n.op in FILE_OPS)
        for fn in meta.graph_def.library.function:
            found.update(n.op for n in fn.node_def if n.op in FILE_OPS)
    return sorted(found)


class SavedModelRuntime(Runtime):
    """A SavedModel's signatures; `source` is the signature name. No graph, so no taps."""

    def __init__(self, path: Path, devices: Sequence[str], batches_per_device: int,
                 allow_file_ops: bool = False) -> None:
        super().__init__(devices, batches_per_device)
        found = [] if allow_file_ops else file_ops(path)
        if found:
            raise ConfigError(
                f"the SavedModel's graph holds file or system ops {found}: serving it would "
                "let its signatures read or write files on the server; set `allow_file_ops: "
                "true` in its config.yaml if you trust it",
                category="refused: its graph holds file or system ops (allow_file_ops)")
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
