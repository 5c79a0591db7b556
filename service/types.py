"""The internal request/response types every protocol converts to and from."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from service.errors import TapserveError
from service.statistics import VersionStatistics

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
    json: bool = False  # its outputs go back as JSON numbers (up to 27 bytes an element)


@dataclass(frozen=True)
class Target:
    """What one request resolved to, once: the version that serves it, its endpoint, and
    that endpoint's inputs by name (what the request's tensors are decoded against)."""

    model: str
    version: int
    endpoint: str
    inputs: Mapping[str, TensorSpec]  # what every request sends
    max_rows: int | None = None  # the most rows one request may carry (its queue's size)
    optional: Mapping[str, TensorSpec] = field(default_factory=dict)  # explain's `target`


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


class Call(Protocol):
    """One inference request on its way through the data plane, used as `with call:`.
    A door reads the names, `resolve`s them (once), decodes against the target's inputs
    and `infer`s; however the block ends, the outcome is counted and logged there, once."""

    def resolve(self, model: str, endpoint: str | None, version: str | None) -> Target:
        """The version and endpoint that serve these names; raises NotFound or NotReady."""
        ...

    async def infer(self, request: InferRequest) -> InferResponse:
        """Compute the request on the resolved target; raises TapserveError subclasses."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None: ...


class DataPlane(Protocol):
    """The protocol-independent core every door calls (service.dataplane.DataPlane is the
    server's; tests/protocol/echo.py is the protocol tests' double, checked by mypy)."""

    @property
    def draining(self) -> bool: ...

    async def until_draining(self) -> None:
        """Return once the server drains (streams stop reading then)."""
        ...

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def not_ready(self) -> list[tuple[str | None, str]]:
        """Why the server is not ready: (the model it is about, or None; a few words)."""
        ...

    def model_ready(self, model: str, endpoint: str | None, version: str | None) -> bool:
        """Whether that endpoint can serve now; raises NotFound if it is unknown."""
        ...

    def server_metadata(self) -> tuple[str, str, list[str]]:
        """The server's (name, version, protocol extensions)."""
        ...

    def model_metadata(self, model: str, endpoint: str | None, version: str | None
                       ) -> EndpointMetadata:
        """Raises NotFound if the endpoint is unknown."""
        ...

    def model_endpoints(self, model: str, version: str | None
                        ) -> tuple[int, str, list[EndpointMetadata]]:
        """(version, default endpoint, every endpoint's metadata) of the version that
        answers for (model, version)."""
        ...

    def model_status(self, model: str, version: str | None = None
                     ) -> list[tuple[int, str, str]]:
        """(version, state, reason) of the model's versions, or of the one named."""
        ...

    def call(self, protocol: str, model: str, endpoint: str | None = None,
             request_id: str = "") -> Call:
        """One inference request through door `protocol`; `model` and `endpoint` are the
        names as the client sent them (for the log, until the call resolves them)."""
        ...

    def refused(self, protocol: str, model: str, endpoint: str | None,
                error: TapserveError) -> None:
        """Count and log a request refused before its door read it (no token)."""
        ...

    def model_statistics(self, model: str, version: str | None
                         ) -> list[tuple[str, int, VersionStatistics]]:
        """(model, version, statistics) of the versions that serve ("" model: all)."""
        ...

    def repository_index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) for every model and version known."""
        ...

    async def load_model(self, name: str) -> None: ...

    async def unload_model(self, name: str) -> None: ...
