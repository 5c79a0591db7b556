"""The Keras backend a server runs on (--backend), picked once per process.

Keras reads KERAS_BACKEND at its first import, so `select` runs before anything imports
keras. The backends' modules are imported here lazily, on first use: a server on jax never
imports tensorflow, and one on tensorflow never imports jax.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from service.errors import ConfigError
from service.types import STRING

if TYPE_CHECKING:
    from service.graph import TapGraph
    from service.runtime import Runtime
    from service.runtime_tf import SavedModelRuntime

log = logging.getLogger(__name__)

Backend = Literal["tensorflow", "jax"]
PACKAGE = {"tensorflow": "tensorflow", "jax": "jax"}
# Keras layers that run only on TensorFlow (tf.lookup tables, string ops): refused on jax.
TENSORFLOW_ONLY = ("StringLookup", "IntegerLookup", "TextVectorization", "Hashing")


def select(backend: Backend, gpu_memory_limit_mb: int | None = None) -> None:
    """Make `backend` the process's Keras backend; ConfigError if its package is missing or
    keras already runs on another one (a second server in one process). On jax, also the
    GPU memory settings, which JAX reads once, when it starts."""
    package = PACKAGE[backend]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"the {backend} backend needs {package}: "
                          f"pip install 'tapserve[{backend}]'")
    keras = sys.modules.get("keras")
    if keras is not None:
        current = keras.backend.backend()
        if current != backend:
            raise ConfigError(
                f"keras is already imported on the {current} backend in this process, and "
                f"picks its backend once, at import: a server on {backend} needs a process of "
                f"its own (or set KERAS_BACKEND={backend} before keras is imported)")
        return
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        if "tensorflow" not in sys.modules:
            sys.meta_path.insert(0, _WithoutTensorFlow())
        # Memory grows as needed, as TensorFlow's memory growth does.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if gpu_memory_limit_mb:
            _jax_memory_fraction(gpu_memory_limit_mb)


class _WithoutTensorFlow(importlib.abc.MetaPathFinder):
    """On jax, TensorFlow stays out of the process even where it is installed: Keras uses
    it when it finds it (its .h5 reader imports it to decode shapes), and then takes the
    path it takes on a machine without it, as a JAX deployment has."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> None:
        if fullname.partition(".")[0] in ("tensorflow", "tensorflow_serving"):
            raise ModuleNotFoundError(f"No module named {fullname!r}: this server runs on "
                                      "jax", name=fullname)


def _jax_memory_fraction(limit_mb: int) -> None:
    """JAX caps its GPU memory by a fraction of the card (XLA_PYTHON_CLIENT_MEM_FRACTION),
    not in MB: the fraction is the limit over the smallest card's memory, read from
    nvidia-smi before JAX starts. Without nvidia-smi (no NVIDIA GPU) there is nothing to cap."""
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ:
        log.warning("XLA_PYTHON_CLIENT_MEM_FRACTION is set: --gpu-memory-limit-mb is ignored")
        return
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        total = min(int(line) for line in out.split())
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.warning("cannot read the GPUs' memory (%s): --gpu-memory-limit-mb is ignored; set "
                    "XLA_PYTHON_CLIENT_MEM_FRACTION instead", exc)
        return
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(1.0, limit_mb / total):.4f}"


def current() -> Backend:
    """The backend keras runs on (importing keras if nothing has yet)."""
    import keras

    name = keras.backend.backend()
    if name not in PACKAGE:
        raise ConfigError(f"keras runs on the {name} backend; tapserve serves on "
                          f"{' or '.join(PACKAGE)} (KERAS_BACKEND)")
    return "jax" if name == "jax" else "tensorflow"


def configure(backend: Backend, intra_op_threads: int, inter_op_threads: int,
              gpu_memory_limit_mb: int | None) -> list[str]:
    """Set the backend's process-wide options (once, before any op runs); its devices."""
    import keras

    log.info("backend: %s (keras %s)", backend, keras.__version__)
    if backend == "jax":
        from service.runtime_jax import configure_jax

        return configure_jax(gpu_memory_limit_mb)
    from service.runtime_tf import configure_tensorflow

    return configure_tensorflow(intra_op_threads, inter_op_threads, gpu_memory_limit_mb)


def gpu_memory_reader(backend: Backend) -> Callable[[], dict[str, int]]:
    """The function that reads the bytes the backend holds on each GPU."""
    if backend == "jax":
        from service.runtime_jax import gpu_memory_in_use
    else:
        from service.runtime_tf import gpu_memory_in_use
    return gpu_memory_in_use


def keras_runtime(backend: Backend) -> Callable[..., Runtime]:
    """The runtime class that runs a Keras model's graph on `backend`."""
    if backend == "jax":
        from service.runtime_jax import JaxRuntime

        return JaxRuntime
    from service.runtime_tf import KerasRuntime

    return KerasRuntime


def refuse_load_failure(path: object, exc: Exception) -> ConfigError | None:
    """On jax, the refusal naming the backend for a model whose file keras cannot load
    because it holds TensorFlow-only layers (without TensorFlow installed); else None."""
    keras = sys.modules.get("keras")
    if keras is None or keras.backend.backend() != "jax":
        return None
    text = str(exc)
    layers = [name for name in TENSORFLOW_ONLY if name in text]
    if not layers and "tensorflow" not in text.lower():
        return None
    what = f"TensorFlow-only layers ({', '.join(layers)})" if layers else "TensorFlow"
    return ConfigError(f"{path}: the model needs {what}: it serves with --backend tensorflow; "
                       "this server runs jax", category="refused: it needs the tensorflow backend")


def refuse_tensorflow_layers(classes: set[str], name: str) -> None:
    """ConfigError naming the backend model `name` needs, if its saved config names layers
    that run only on TensorFlow (checked before Keras builds them)."""
    layers = sorted(classes.intersection(TENSORFLOW_ONLY))
    if layers:
        raise ConfigError(f"model {name!r} has TensorFlow-only layers ({', '.join(layers)}): "
                          "it serves with --backend tensorflow; this server runs jax",
                          category="refused: it needs the tensorflow backend")


def refuse_tensorflow_only(graph: TapGraph, name: str) -> None:
    """ConfigError naming the backend model `name` needs, if it has string tensors or
    layers that run only on TensorFlow: JAX has no string tensors."""
    layers = sorted({t.layer for t in graph.taps.values() if t.layer in TENSORFLOW_ONLY})
    strings = sorted(n for n, t in graph.taps.items() if t.dtype == STRING)
    if layers or strings:
        what = (f"TensorFlow-only layers ({', '.join(layers)})" if layers
                else f"string tensors ({', '.join(strings[:5])})")
        raise ConfigError(f"model {name!r} has {what}: it serves with --backend tensorflow; "
                          "this server runs jax, which has no string tensors",
                          category="refused: it needs the tensorflow backend")


def saved_model_runtime(backend: Backend, name: str) -> type[SavedModelRuntime]:
    """The SavedModel runtime (TensorFlow only): on jax, ConfigError naming the backend."""
    if backend == "jax":
        raise ConfigError(f"model {name!r} is a TensorFlow SavedModel: it serves with "
                          "--backend tensorflow; this server runs jax",
                          category="refused: it needs the tensorflow backend")
    from service.runtime_tf import SavedModelRuntime

    return SavedModelRuntime
