"""Micro-benchmark of service/tracing.py: what tracing adds to one request on the event
loop, off (the default) and on, for 8 requests that share one batch.

    .venv/bin/python bench/tracing_micro.py [--endpoint http://127.0.0.1:4318]

Per request, the door's `with tracing.request(...)`, the batcher's `current()` at submit,
its share of `record_batch` and `answered`; on, the spans are exported by the server's
BatchSpanProcessor to `--endpoint` (bench/otlp_sink.py), whose thread competes for the
GIL as in the server: its time is in the figure. Best of 5 repeats, in microseconds per
request; compare with a request's server CPU (about 1 ms for scenario 2's 1-row dense64).
"""

from __future__ import annotations

import argparse
import time
import timeit

import numpy as np

from service import tracing
from service.batcher import Work

BATCH = 8
ROW = {"x": np.zeros((1, 64), np.float32)}
HEADERS = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def batch_of_requests(plane: tracing.Tracing, headers: dict[str, str]) -> None:
    """BATCH requests through one batch, as the door and the batcher call tracing."""
    traces = [plane.request("kserve_grpc", "dense64", headers) for _ in range(BATCH)]
    works = []
    for trace in traces:  # each request's task enters its trace and submits
        trace.__enter__()
        works.append(Work("s", ROW, (), None, None, trace=tracing.current()))
    tracing.record_batch(works, time.monotonic())
    for trace in reversed(traces):  # each is answered and leaves the door
        trace.answered(_RESPONSE)  # type: ignore[arg-type]
        trace.__exit__(None, None, None)


class _Response:
    model, endpoint, version = "dense64", "default", 1


_RESPONSE = _Response()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="http://127.0.0.1:4318")
    args = parser.parse_args()
    number = 500
    for name, plane in (("off", tracing.setup(None)), ("on", tracing.setup(args.endpoint))):
        for headers, what in ((HEADERS, "with a caller's traceparent"), ({}, "without")):
            best = min(timeit.repeat(lambda p=plane, h=headers: batch_of_requests(p, h),
                                     number=number, repeat=5))
            print(f"tracing {name}, {what}: {best / number / BATCH * 1e6:.1f} µs per request")
        plane.shutdown()


if __name__ == "__main__":
    main()
