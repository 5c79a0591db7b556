"""A loaded model version: its endpoints, and the checks a request must pass for one."""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np

from service.config import ModelConfig
from service.errors import ConfigError, InvalidInput, NotFound
from service.graph import TapGraph, suggest
from service.repository import ModelSource
from service.runtime import KerasRuntime, Runtime, SavedModelRuntime
from service.types import STRING, EndpointMetadata, TensorSpec

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "default"


@dataclass(frozen=True)
class Endpoint:
    """One servable cut of a model: fixed inputs, default outputs, what else may be asked."""

    name: str
    source: Hashable  # what the runtime computes from: input tap names, or a signature
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    askable: frozenset[str]  # outputs a request may name (its outputs, plus taps if allowed)
    taps_hint: str  # why a name outside `askable` cannot be asked for


@dataclass
class Prepared:
    """A request checked against its endpoint, ready for the batcher."""

    endpoint: Endpoint
    outputs: tuple[str, ...]
    feeds: dict[str, np.ndarray]
    rows: int


def _uses_lambda(config: object) -> bool:
    if isinstance(config, dict):
        return config.get("class_name") == "Lambda" or any(
            _uses_lambda(v) for v in config.values())
    if isinstance(config, list):
        return any(_uses_lambda(v) for v in config)
    return False


def load_keras(path: Path, fmt: str, allow_lambda: bool) -> keras.Model:
    """Load a .keras or legacy .h5 model, refusing Lambda layers unless allowed."""
    lambda_refused = ConfigError(
        f"{path}: the model has a Lambda layer, and loading it runs code stored in the file; "
        "set `allow_lambda: true` in its config.yaml if you trust the file")
    if fmt == "h5" and not allow_lambda:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
        if raw is not None and _uses_lambda(json.loads(raw)):
            raise lambda_refused
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not allow_lambda)
    except ValueError as exc:
        if "Lambda" in str(exc) and "safe_mode" in str(exc):
            raise lambda_refused from None
        raise ConfigError(f"{path}: cannot load model: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{path}: cannot load model: {exc}") from exc


class LoadedModel:
    """One version of one model, loaded, its endpoints defined and warmed up."""

    def __init__(self, source: ModelSource, runtime: Runtime, endpoints: dict[str, Endpoint],
                 default_endpoint: str, platform: str) -> None:
        self.name = source.name
        self.version = source.version
        self.versions = source.versions
        self.runtime = runtime
        self.endpoints = endpoints
        self.default_endpoint = default_endpoint
        self.platform = platform

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

    def metadata(self, endpoint: str | None) -> EndpointMetadata:
        ep = self.endpoint(endpoint)
        return EndpointMetadata(self.name, ep.name, self.versions, self.platform,
                                ep.inputs, ep.outputs)

    def prepare(self, ep: Endpoint, inputs: dict[str, np.ndarray],
                outputs: Sequence[str]) -> Prepared:
        """Check a request's inputs and asked-for outputs against endpoint `ep`."""
        for name in outputs:
            if name not in ep.askable:
                raise NotFound(f"endpoint {self.name}.{ep.name} has no output {name!r}: "
                               f"{ep.taps_hint}; {suggest(name, ep.askable)}")
        expected = {s.name: s for s in ep.inputs}
        unknown = sorted(set(inputs) - set(expected))
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
        return Prepared(ep, tuple(outputs) or tuple(s.name for s in ep.outputs),
                        inputs, next(iter(rows.values())))


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


def _keras_endpoints(graph: TapGraph, config: ModelConfig) -> dict[str, tuple[list, list]]:
    declared = {n: (e.inputs, e.outputs) for n, e in config.endpoints.items()}
    return declared or {DEFAULT_ENDPOINT: (graph.input_names, graph.output_names)}


def build_keras_model(source: ModelSource, devices: Sequence[str], batches_per_device: int,
                      cache_size: int, max_batch_size: int) -> LoadedModel:
    """Load a .keras/.h5 model, check its config against the graph, define endpoints."""
    config = source.config
    model = load_keras(source.path, source.format, config.allow_lambda)
    try:
        graph = TapGraph(model)
    except TypeError as exc:
        raise ConfigError(f"{source.path}: {exc}") from None
    runtime = KerasRuntime(graph, devices, batches_per_device, cache_size,
                           config.jit_compile, max_batch_size)
    endpoints = {}
    for name, (inputs, outputs) in _keras_endpoints(graph, config).items():
        try:
            graph.plan(inputs, outputs)  # every name exists and outputs follow from inputs
        except NotFound as exc:
            raise ConfigError(f"model {source.name!r}, endpoint {name!r}: {exc}") from None
        askable = graph.computable(inputs) if config.taps else set(outputs)
        hint = ("taps must be computable from its inputs " + str(list(inputs))
                if config.taps else "taps are off for this model (config.yaml `taps: false`)")
        endpoints[name] = Endpoint(name, tuple(inputs), tuple(runtime.spec(n) for n in inputs),
                                   tuple(runtime.spec(n) for n in outputs),
                                   frozenset(askable) | frozenset(outputs), hint)
    return LoadedModel(source, runtime, endpoints,
                       _default(source, endpoints, next(iter(endpoints))), "tensorflow_keras")


def build_saved_model(source: ModelSource, devices: Sequence[str],
                      batches_per_device: int) -> LoadedModel:
    """A SavedModel folder: each signature is an endpoint; it has no graph to tap."""
    if source.config.endpoints:
        raise ConfigError(f"model {source.name!r}: a SavedModel serves its signatures "
                          "as endpoints; config.yaml endpoints need a .keras or .h5 model")
    runtime = SavedModelRuntime(source.path, devices, batches_per_device)
    endpoints = {}
    for name in runtime.signatures:
        inputs, outputs = runtime.specs(name)
        endpoints[name] = Endpoint(
            name, name, tuple(inputs.values()), tuple(outputs.values()), frozenset(outputs),
            "a SavedModel has no layer graph, so only its signature's outputs can be asked "
            "for; serve a .keras or .h5 file for taps")
    fallback = "serving_default" if "serving_default" in endpoints else next(iter(endpoints))
    return LoadedModel(source, runtime, endpoints,
                       _default(source, endpoints, fallback), "tensorflow_savedmodel")


def _default(source: ModelSource, endpoints: dict[str, Endpoint], fallback: str) -> str:
    default = source.config.default_endpoint or fallback
    if default not in endpoints:
        raise ConfigError(f"model {source.name!r}: default_endpoint {default!r} is not "
                          f"one of its endpoints {list(endpoints)}")
    return default
