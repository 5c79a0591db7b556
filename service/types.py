"""The internal request/response types every protocol converts to and from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Tensor element types use numpy's names ("float32", "int64", "bool", ...), plus
# "string" for byte strings (held as numpy object arrays of `bytes`).
STRING = "string"


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of an endpoint input or output.

    `shape` includes the batch dimension first; unknown dimensions are None.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass
class InferRequest:
    """One inference call, protocol-independent."""

    model: str
    inputs: dict[str, np.ndarray]
    endpoint: str | None = None  # None: the model's default endpoint
    version: int | None = None  # None: the served version
    outputs: list[str] = field(default_factory=list)  # empty: the endpoint's outputs
    id: str = ""
    deadline: float | None = None  # time.monotonic() after which it is not computed


@dataclass
class InferResponse:
    model: str
    endpoint: str
    version: int
    outputs: dict[str, np.ndarray]
    id: str = ""


@dataclass(frozen=True)
class EndpointMetadata:
    """What ModelMetadata reports for one endpoint."""

    model: str
    endpoint: str
    versions: tuple[int, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
