"""service/tracing.py off (the default) and at set-up: nothing of OpenTelemetry is imported
or recorded, a batch of untraced requests records nothing, and a bad --otlp-endpoint or a
missing `tracing` extra is refused with what to do. The spans themselves are tested end to
end (tests/e2e/test_tracing.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from service import tracing
from service.batcher import Batcher, BatchPolicy
from service.errors import ConfigError, InvalidInput, NotFound
from service.types import Batch, InferResponse

OFF_PATH = """
import asyncio, sys
import numpy as np
from service import tracing
from service.batcher import Batcher, BatchPolicy

async def run(batch):
    return {"y": batch.feeds["x"] * 2}, 0.0, 0.0

async def main():
    plane = tracing.setup(None)
    batcher = Batcher(run, BatchPolicy(), 1)
    batcher.start()
    with plane.request("kserve_grpc", "m.e", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16
                                                              + "-01"}) as trace:
        assert tracing.current() is None
        out, _ = await batcher.submit("src", {"x": np.ones((2, 1))}, ("y",))
        trace.answered(None)
    await batcher.close(1)
    plane.shutdown()
    return out

out = asyncio.run(main())
assert (out["y"] == 2).all()
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""


def test_off_imports_nothing_of_opentelemetry():
    """Off, a request through the batcher runs without the OpenTelemetry packages: the
    server needs no `tracing` extra."""
    done = subprocess.run([sys.executable, "-c", OFF_PATH], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_off_is_one_shared_object():
    plane = tracing.setup(None)
    assert plane is tracing.NO_TRACING and not plane.enabled
    assert plane.request("kserve_http", "m", {}) is tracing.NO_TRACE
    assert tracing.setup("") is tracing.NO_TRACING


async def test_an_unsampled_caller_records_nothing_a_sampled_one_everything():
    """A caller's traceparent with the sampled flag off (-00) records no span, not even
    the batch it rode in; one with it on (-01) records its request, the children and the
    batch, linked. (InMemorySpanExporter is the SDK's own, behind the BatchSpanProcessor
    the server uses.)"""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exported = InMemorySpanExporter()
    plane = tracing.OtlpTracing(exported)

    async def run(batch: Batch) -> tuple[dict[str, np.ndarray], float, float]:
        return {"y": batch.feeds["x"]}, 0.0, 0.0

    batcher = Batcher(run, BatchPolicy(eager=False, max_queue_delay_ms=50), 1)
    batcher.start()

    async def call(flags: str) -> None:
        header = {"traceparent": f"00-{'a' * 32}-{'b' * 16}-{flags}"}
        with plane.request("kserve_http", "m", header) as trace:
            await batcher.submit("s", {"x": np.ones((1, 1))}, ("y",))
            trace.answered(InferResponse("m", "e", 3, {}))

    await call("00")
    await asyncio.sleep(0.1)  # its own batch
    await asyncio.gather(call("01"), call("01"))
    await batcher.close(1)
    plane.shutdown()
    spans = exported.get_finished_spans()
    assert sorted(s.name for s in spans) == sorted(
        ["batch"] + ["infer", "queue", "compute", "response"] * 2)
    (batch,) = [s for s in spans if s.name == "batch"]
    requests = [s for s in spans if s.name == "infer"]
    assert {link.context.span_id for link in batch.links} == {
        r.context.span_id for r in requests}
    assert batch.attributes["tapserve.batch.requests"] == 2
    for r in requests:
        assert r.context.trace_id == int("a" * 32, 16) and r.parent.span_id == int("b" * 16, 16)
        assert dict(r.attributes) == {"tapserve.door": "kserve_http", "tapserve.model": "m",
                                      "tapserve.endpoint": "e", "tapserve.version": 3,
                                      "tapserve.status": "OK"}


async def test_a_batch_that_fails_is_said_in_every_span():
    """Two requests the model cannot compute: their batch fails, then each alone (the
    batcher's halves). Each request span says INVALID_ARGUMENT and why; each batch span is
    an error; a request has one queue span and a compute span per batch it was tried in."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    exported = InMemorySpanExporter()
    plane = tracing.OtlpTracing(exported)

    async def run(batch: Batch) -> tuple[dict[str, np.ndarray], float, float]:
        raise InvalidInput("token 9 is out of the vocabulary")

    batcher = Batcher(run, BatchPolicy(eager=False, max_queue_delay_ms=50), 1)
    batcher.start()

    async def call() -> None:
        with pytest.raises(InvalidInput), plane.request("kserve_grpc", "m", {}):
            await batcher.submit("s", {"x": np.ones((1, 1))}, ("y",))

    await asyncio.gather(call(), call())
    await batcher.close(1)
    plane.shutdown()
    spans = exported.get_finished_spans()
    batches = [s for s in spans if s.name == "batch"]
    assert len(batches) == 3 and all(b.status.status_code == StatusCode.ERROR for b in batches)
    for request in (s for s in spans if s.name == "infer"):
        assert request.attributes["tapserve.status"] == "INVALID_ARGUMENT"
        assert request.status.status_code == StatusCode.ERROR
        assert "out of the vocabulary" in request.status.description
        kids = [s for s in spans if s.parent and s.parent.span_id == request.context.span_id]
        assert sorted(k.name for k in kids) == ["compute", "compute", "queue"]


@pytest.mark.parametrize("url", ["localhost:4318", "grpc://collector:4317", "http://"])
def test_an_endpoint_that_is_not_an_http_url_is_refused(url: str):
    with pytest.raises(ConfigError, match="must be an http:// or https:// URL"):
        tracing.setup(url)


def test_without_the_extra_the_start_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch):
    # None in sys.modules: importing it raises ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules,
                        "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"pip install tapserve\[tracing\]"):
        tracing.setup("http://127.0.0.1:4318")


def test_status_is_the_metrics_code():
    assert tracing.status_of(None) == "OK"
    assert tracing.status_of(NotFound("x")) == "NOT_FOUND"
    assert tracing.status_of(asyncio.CancelledError()) == "CANCELLED"
    assert tracing.status_of(ValueError()) == "INTERNAL"
