"""The protocol tests' stand-in for the data plane: model "echo" (endpoints default and
"twin", version 1) returns its inputs as outputs; the models in ERRORS raise.

Typed strictly and checked by mypy with service/ (scripts/test.sh): `_contract` below
fails the type check, not a test, when the fake drifts from service.types.DataPlane."""

from __future__ import annotations

from types import TracebackType

from service.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    TapserveError,
)
from service.statistics import VersionStatistics
from service.types import (
    DataPlane,
    EndpointMetadata,
    InferRequest,
    InferResponse,
    Target,
    TensorSpec,
)

# model name -> what the fake core raises, and the status the client must see
ERRORS: dict[str, tuple[Exception, str]] = {
    "missing": (NotFound("model 'missing' is not served; served: echo"), "NOT_FOUND"),
    "bad": (InvalidInput("input 'x' must be FP32, got INT64"), "INVALID_ARGUMENT"),
    "busy": (Overloaded("queue of 'busy' is full: 8 waiting"), "RESOURCE_EXHAUSTED"),
    "warming": (NotReady("model 'warming' is still loading"), "UNAVAILABLE"),
    "late": (DeadlineExceeded("deadline passed before compute"), "DEADLINE_EXCEEDED"),
    "gone": (Cancelled("the client went away"), "CANCELLED"),
}
SECRET = "secret detail from deep inside"


class EchoDataPlane:
    def __init__(self) -> None:
        self.requests: list[InferRequest] = []
        self.resolved: list[tuple[str, str | None, str | None]] = []
        # (model, endpoint, request id, error type) of every failed call
        self.rejections: list[tuple[str, str | None, str, str]] = []

    @property
    def draining(self) -> bool:
        return False

    async def until_draining(self) -> None:
        return None

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def not_ready(self) -> list[tuple[str | None, str]]:
        return []

    def model_ready(self, model: str, endpoint: str | None, version: str | None) -> bool:
        if model == "warming":
            return False
        self.check(model, endpoint, version)
        return True

    def server_metadata(self) -> tuple[str, str, list[str]]:
        return "tapserve", "0.1.0", ["model_repository"]

    def model_metadata(self, model: str, endpoint: str | None, version: str | None
                       ) -> EndpointMetadata:
        self.check(model, endpoint, version)
        spec = TensorSpec("x", "float32", (None, 3))
        return EndpointMetadata(model, endpoint or "echo", (1,), "test_echo", (spec,), (spec,))

    def model_endpoints(self, model: str, version: str | None
                        ) -> tuple[int, str, list[EndpointMetadata]]:
        return 1, "echo", [self.model_metadata(model, None, version)]

    def model_status(self, model: str, version: str | None = None
                     ) -> list[tuple[int, str, str]]:
        self.check(model, None, version)
        return [(1, "READY", "")]

    def call(self, protocol: str, model: str, endpoint: str | None = None,
             request_id: str = "") -> EchoCall:
        return EchoCall(self, model, endpoint, request_id)

    def refused(self, protocol: str, model: str, endpoint: str | None,
                error: TapserveError) -> None:
        self.rejections.append((model, endpoint, "", type(error).__name__))

    def model_statistics(self, model: str, version: str | None
                         ) -> list[tuple[str, int, VersionStatistics]]:
        self.check(model, None, version)
        return [(model, 1, VersionStatistics())]

    def repository_index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        entries = [("echo", "1", "READY", ""), ("broken", "2", "UNAVAILABLE", "bad file")]
        return [e for e in entries if e[2] == "READY"] if ready_only else entries

    async def load_model(self, name: str) -> None:
        self.check(name, None, None)

    async def unload_model(self, name: str) -> None:
        self.check(name, None, None)

    @staticmethod
    def check(model: str, endpoint: str | None, version: str | None) -> None:
        if model != "echo" or endpoint not in (None, "twin") or version not in (None, "1"):
            raise NotFound(f"no model {model!r} endpoint {endpoint!r} version {version!r}")


class EchoCall:
    """One request to the fake: "echo" takes any input (nothing is checked before its
    tensors are decoded); the models in ERRORS and "boom" fail when inferred."""

    def __init__(self, plane: EchoDataPlane, model: str, endpoint: str | None,
                 request_id: str) -> None:
        self._plane = plane
        self.model, self.endpoint, self.request_id = model, endpoint, request_id

    def resolve(self, model: str, endpoint: str | None, version: str | None) -> Target:
        self.model, self.endpoint = model, endpoint
        self._plane.resolved.append((model, endpoint, version))
        if model not in ERRORS and model != "boom":
            self._plane.check(model, endpoint, version)
        return Target(model, 1, endpoint or "echo", {})

    async def infer(self, request: InferRequest) -> InferResponse:
        self._plane.requests.append(request)
        if request.model in ERRORS:
            raise ERRORS[request.model][0]
        if request.model == "boom":
            raise RuntimeError(SECRET)
        names = request.outputs or list(request.inputs)
        unknown = [n for n in names if n not in request.inputs]
        if unknown:
            raise NotFound(f"no output {unknown[0]!r}")
        outputs = {n: request.inputs[n] for n in names}
        return InferResponse(request.model, request.endpoint or "echo", 1, outputs, request.id)

    def __enter__(self) -> EchoCall:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is not None:
            self._plane.rejections.append(
                (self.model, self.endpoint, self.request_id, type(error).__name__))


def _contract(plane: EchoDataPlane) -> DataPlane:
    return plane  # mypy: the fake is a DataPlane (never called)
