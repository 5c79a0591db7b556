"""Helpers both test sessions share (no protobuf of anybody's): read /metrics, poll."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus text endpoint; None if none has those labels."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return None


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll `condition` until it is truthy (its value is returned) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value
