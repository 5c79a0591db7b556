"""The internal request/response types every protocol converts to and from."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
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

    def describe(self) -> str:
        """How messages name it: "image (float32 [-1,8,8,1])"."""
        dims = ",".join("-1" if d is None else str(d) for d in self.shape)
        return f"{self.name} ({self.dtype} [{dims}])"

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of `shape` fits: the same rank, and the fixed dimensions."""
        return len(shape) == len(self.shape) and all(
            want in (None, got) for want, got in zip(self.shape, shape, strict=True))


@dataclass
class InferRequest:
    """One inference call, protocol-independent."""

    model: str
    inputs: dict[str, np.ndarray]
    endpoint: str | None = None  # None: the model's default endpoint
    version: str | None = None  # a version number or a label; None: the highest ready
    outputs: list[str] = field(default_factory=list)  # empty: the endpoint's outputs
    id: str = ""
    deadline: float | None = None  # time.monotonic() after which it is not computed
    protocol: str = "kserve_grpc"  # the front door it came through (a metrics label)
    json: bool = False  # its outputs go back as JSON numbers (up to 27 bytes an element)


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
    optional: frozenset[str] = frozenset()  # inputs a request may leave out (explain's target)


@dataclass
class Batch:
    """Requests merged into one forward pass: what the batcher hands the runtime."""

    source: Hashable  # what the runtime computes from (an endpoint's inputs, a signature)
    outputs: tuple[str, ...]
    feeds: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] | None  # per output, the rows that asked for it; None: all

    @property
    def rows(self) -> int:
        return len(next(iter(self.feeds.values())))

    def check(self, result: dict[str, np.ndarray]) -> None:
        """Raise unless each output holds one row per row that asked for it."""
        for name in self.outputs:
            want = int(self.masks[name].sum()) if self.masks is not None else self.rows
            got = result[name].shape[0] if result[name].ndim else None
            if got != want:
                raise RuntimeError(f"the model returned {got} rows for output {name!r}, "
                                   f"expected {want}")
