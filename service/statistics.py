"""Per model version statistics, as Triton's statistics extension reports them: cumulative
counts and nanoseconds, kept by the version itself (they go when it is unloaded)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStatistics:
    """Requests: success and fail with their whole time in the server; queue and
    compute_infer split a successful request's time (queued, then its batch until its
    answer). Batches: how many ran, and their compute time by batch size."""

    inference_count: int = 0  # rows answered (Triton counts each row an inference)
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # by batch size

    def succeeded(self, rows: int, seconds: float, queued: float) -> None:
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.success.add(seconds)
        self.queue.add(queued)
        self.compute_infer.add(max(0.0, seconds - queued))

    def failed(self, seconds: float) -> None:
        self.fail.add(seconds)

    def batch(self, rows: int, seconds: float) -> None:
        self.execution_count += 1
        self.batches.setdefault(rows, Duration()).add(seconds)
