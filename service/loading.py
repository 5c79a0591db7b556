"""Loading one model version: its code, its file, its endpoints, its warm-up.

Blocking (TensorFlow and the filesystem): the registry calls `Loader.load` on its loader
thread, never on the event loop.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import keras

from service import backends
from service.backends import Backend
from service.batcher import BatchPolicy
from service.config import ExplainConfig, ModelConfig
from service.errors import ConfigError, NotFound
from service.explain import ATTRIBUTION
from service.explain import check as check_explanation
from service.graph import TapGraph
from service.model import DEFAULT_ENDPOINT, Endpoint, LoadedModel
from service.modelcode import forget_model_code, import_model_code
from service.repository import ModelSource
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)


class Loader:
    """Turns a ModelSource into a warmed-up LoadedModel, with the server's settings."""

    def __init__(self, settings: Settings, devices: Sequence[str]) -> None:
        self.settings = settings
        self.devices = list(devices)

    def policy(self, config: ModelConfig) -> BatchPolicy:
        b, s = config.batching, self.settings
        return BatchPolicy(
            max_batch_size=b.max_batch_size or s.max_batch_size,
            max_queue_delay_ms=(b.max_queue_delay_ms if b.max_queue_delay_ms is not None
                                else s.max_queue_delay_ms),
            max_queue_size=b.max_queue_size or s.max_queue_size,
            shared_passes=b.shared_passes,
            eager=b.eager if b.eager is not None else s.eager_batching,
            dedup_rows=b.dedup_rows)

    def load(self, source: ModelSource) -> LoadedModel:
        """Load and warm up; raises ConfigError (or anything a broken file raises)."""
        policy = self.policy(source.config)
        gpu = self.devices[0].startswith("/GPU")
        s = self.settings
        options = BuildOptions(self.devices,
                               s.gpu_batches_in_flight if gpu else s.cpu_batches_in_flight,
                               s.compiled_cache_size, policy.max_batch_size, s.allow_model_code,
                               s.backend)
        model = FORMATS[source.format].build(source, options)
        try:
            model.warm_up(policy.shared_passes)
        except BaseException:
            model.release()
            raise
        model.policy = policy
        model.max_response_bytes = self.settings.max_response_bytes
        return model


def check_model_file(path: Path, fmt: str) -> None:
    """Refuse a model file that is not what its name says, before a library reports it in
    its own words (Keras calls a garbage .keras file "not found")."""
    if fmt == "keras" and not zipfile.is_zipfile(path):
        raise ConfigError(f"{path.name} is not a valid .keras file (a zip archive saved by "
                          "model.save): replace it", category="its model file is not valid")
    if fmt == "h5" and not h5py.is_hdf5(path):
        raise ConfigError(f"{path.name} is not a valid .h5 file (HDF5): replace it",
                          category="its model file is not valid")


def _classes(config: object) -> set[str]:
    """Every layer class a saved model config names, nested models' included."""
    if isinstance(config, dict):
        own = {config["class_name"]} if isinstance(config.get("class_name"), str) else set()
        return own.union(*(_classes(v) for v in config.values()))
    if isinstance(config, list):
        return set().union(*(_classes(v) for v in config))
    return set()


def _saved_config(path: Path, fmt: str) -> object:
    """The model config stored in a .keras (config.json) or .h5 (model_config) file, read
    without building the model; None if the file holds none."""
    try:
        if fmt == "h5":
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
        else:
            with zipfile.ZipFile(path) as z:
                raw = z.read("config.json") if "config.json" in z.namelist() else None
    except (OSError, zipfile.BadZipFile):
        return None  # keras says what is wrong with the file
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def load_keras(path: Path, fmt: str, allow_lambda: bool,
               custom_objects: dict[str, Any] | None = None,
               backend: Backend = "tensorflow", name: str = "") -> keras.Model:
    """Load a .keras or legacy .h5 model, refusing Lambda layers unless allowed, and on jax
    the layers only TensorFlow runs: before Keras builds them, as building one (a
    StringLookup) imports TensorFlow wherever it is installed."""
    check_model_file(path, fmt)
    lambda_refused = ConfigError(
        f"{path}: the model has a Lambda layer, and loading it runs code stored in the file; "
        "set `allow_lambda: true` in its config.yaml if you trust the file",
        category="refused: it has a Lambda layer (allow_lambda)")
    classes = _classes(_saved_config(path, fmt))
    if fmt == "h5" and not allow_lambda and "Lambda" in classes:
        raise lambda_refused
    if backend == "jax":
        backends.refuse_tensorflow_layers(classes, name or str(path))
    try:
        with keras.saving.custom_object_scope(custom_objects or {}):
            return keras.models.load_model(path, compile=False, safe_mode=not allow_lambda,
                                           custom_objects=custom_objects)
    except ValueError as exc:
        if "Lambda" in str(exc) and "safe_mode" in str(exc):
            raise lambda_refused from None
        raise backends.refuse_load_failure(path, exc) or ConfigError(
            f"{path}: cannot load model: {exc}") from exc
    except Exception as exc:
        raise backends.refuse_load_failure(path, exc) or ConfigError(
            f"{path}: cannot load model: {exc}") from exc


def _keras_endpoints(graph: TapGraph, config: ModelConfig
                     ) -> dict[str, tuple[list[str], list[str]] | ExplainConfig]:
    declared: dict[str, tuple[list[str], list[str]] | ExplainConfig] = {
        n: e if isinstance(e, ExplainConfig) else (e.inputs, e.outputs)
        for n, e in config.endpoints.items()}
    return declared or {DEFAULT_ENDPOINT: (graph.input_names, graph.output_names)}


def build_keras_model(source: ModelSource, devices: Sequence[str], batches_per_device: int,
                      cache_size: int, max_batch_size: int,
                      allow_model_code: bool = False,
                      backend: Backend = "tensorflow") -> LoadedModel:
    """Load a .keras/.h5 model, check its config against the graph, define endpoints."""
    config = source.config
    custom_objects, modules = import_model_code(source, allow_model_code)
    try:
        model = load_keras(source.path, source.format, config.allow_lambda, custom_objects,
                           backend, source.name)
        try:
            graph = TapGraph(model)
        except TypeError as exc:
            raise ConfigError(f"{source.path}: {exc}") from None
        if backend == "jax":
            backends.refuse_tensorflow_only(graph, source.name)
        runtime = backends.keras_runtime(backend)(graph, devices, batches_per_device,
                                                  cache_size, config.jit_compile,
                                                  max_batch_size)
    except BaseException:
        forget_model_code(modules)
        raise
    endpoints: dict[str, Endpoint] = {}
    refused: dict[str, ConfigError] = {}
    try:
        for name, cut in _keras_endpoints(graph, config).items():
            if isinstance(cut, ExplainConfig):
                try:
                    endpoints[name] = _explain_endpoint(graph, runtime, source, name, cut)
                except ConfigError as exc:  # the model's other endpoints still serve
                    log.error("%s", exc)
                    refused[name] = exc
                continue
            inputs, outputs = cut
            try:
                graph.plan(inputs, outputs)  # every name exists and outputs follow from inputs
            except NotFound as exc:
                raise ConfigError(f"model {source.name!r}, endpoint {name!r}: {exc}",
                                  category="its config.yaml does not fit the model") from None
            askable = graph.computable(inputs) if config.taps else set(outputs)
            hint = ("taps must be computable from its inputs " + str(list(inputs))
                    if config.taps else "taps are off for this model (config.yaml `taps: false`)")
            endpoints[name] = Endpoint(
                name, tuple(inputs), tuple(runtime.spec(n) for n in inputs),
                tuple(runtime.spec(n) for n in outputs),
                frozenset(askable) | frozenset(outputs), hint)
        if not endpoints:
            raise next(iter(refused.values()))
        default = _default(source, endpoints, next(iter(endpoints)), refused)
    except BaseException:
        runtime.close()
        forget_model_code(modules)
        raise
    return LoadedModel(source, runtime, endpoints, default, "tensorflow_keras", modules,
                       {name: str(exc) for name, exc in refused.items()})


def _explain_endpoint(graph: TapGraph, runtime: Runtime, source: ModelSource, name: str,
                      config: ExplainConfig) -> Endpoint:
    """An explain endpoint: the model's inputs (and `target`) -> `attribution`."""
    explanation, attribution = check_explanation(
        graph, f"model {source.name!r}, endpoint {name!r}", name, config)
    inputs, _ = runtime.specs(explanation)
    return Endpoint(name, explanation, tuple(inputs.values()), (attribution,),
                    frozenset({ATTRIBUTION}),
                    f"an explanation answers its {ATTRIBUTION!r} only, not taps")


def build_saved_model(source: ModelSource, devices: Sequence[str],
                      batches_per_device: int, backend: Backend = "tensorflow") -> LoadedModel:
    """A SavedModel folder: each signature is an endpoint; it has no graph to tap."""
    saved_model_runtime = backends.saved_model_runtime(backend, source.name)
    if any(isinstance(e, ExplainConfig) for e in source.config.endpoints.values()):
        raise ConfigError(f"model {source.name!r}: explain endpoints need the model's Keras "
                          "layer graph, which a SavedModel does not have; serve a .keras or "
                          ".h5 file to explain it")
    if source.config.endpoints:
        raise ConfigError(f"model {source.name!r}: a SavedModel serves its signatures "
                          "as endpoints; config.yaml endpoints need a .keras or .h5 model")
    runtime = saved_model_runtime(source.path, devices, batches_per_device,
                                  source.config.allow_file_ops)
    endpoints: dict[str, Endpoint] = {}
    for name in runtime.signatures:
        inputs, outputs = runtime.specs(name)
        endpoints[name] = Endpoint(
            name, name, tuple(inputs.values()), tuple(outputs.values()), frozenset(outputs),
            "a SavedModel has no layer graph, so only its signature's outputs can be asked "
            "for; serve a .keras or .h5 file for taps")
    fallback = "serving_default" if "serving_default" in endpoints else next(iter(endpoints))
    try:
        default = _default(source, endpoints, fallback)
    except BaseException:
        runtime.close()
        raise
    return LoadedModel(source, runtime, endpoints, default, "tensorflow_savedmodel")


def _default(source: ModelSource, endpoints: dict[str, Endpoint], fallback: Hashable,
             refused: dict[str, ConfigError] | None = None) -> str:
    default = source.config.default_endpoint or fallback
    if refused and default in refused:  # the bare model name would answer nothing
        raise refused[default]
    if default not in endpoints:
        raise ConfigError(f"model {source.name!r}: default_endpoint {default!r} is not "
                          f"one of its endpoints {list(endpoints)}")
    return str(default)


@dataclass(frozen=True)
class BuildOptions:
    """What building a model takes from the server (tapserve inspect: the least of each)."""

    devices: Sequence[str] = ("/CPU:0",)
    batches_per_device: int = 1
    cache_size: int = 1
    max_batch_size: int = 1
    allow_model_code: bool = False
    backend: Backend = "tensorflow"


@dataclass(frozen=True)
class ModelFormat:
    """One kind of model a version folder may hold: how it is found, built, described."""

    name: str  # ModelSource.format
    marker: str  # the file in a version folder that says the folder holds this format
    is_folder: bool  # the model is the version folder itself, not the marker file
    build: Callable[[ModelSource, BuildOptions], LoadedModel]  # not yet warmed up
    no_taps: str  # why it has no taps, when it has none ("": it has a layer graph)


def _keras(source: ModelSource, o: BuildOptions) -> LoadedModel:
    return build_keras_model(source, o.devices, o.batches_per_device, o.cache_size,
                             o.max_batch_size, o.allow_model_code, o.backend)


def _saved_model(source: ModelSource, o: BuildOptions) -> LoadedModel:
    return build_saved_model(source, o.devices, o.batches_per_device, o.backend)


# Looked for in this order inside a version folder.
FORMATS = {f.name: f for f in (
    ModelFormat("keras", "model.keras", False, _keras, ""),
    ModelFormat("h5", "model.h5", False, _keras, ""),
    ModelFormat("saved_model", "saved_model.pb", True, _saved_model,
                "a SavedModel has signatures only, no layer graph"),
)}


def find_model_file(folder: Path) -> tuple[Path, str]:
    """The model (file, or folder for a SavedModel) of one version folder, and its format."""
    for f in FORMATS.values():
        if (folder / f.marker).exists():
            return (folder if f.is_folder else folder / f.marker), f.name
    raise ConfigError(f"{folder} holds none of {', '.join(f.marker for f in FORMATS.values())}",
                      category="its version folder holds no model file")


def model_source(name: str, version: int, folder: Path, config: ModelConfig) -> ModelSource:
    """What to load for one version folder of model `name`."""
    path, fmt = find_model_file(folder)
    return ModelSource(name, version, path, fmt, config)
