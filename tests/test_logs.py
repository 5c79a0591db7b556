"""The JSON-mode relay's line wrapping (service.logs.wrap); end to end in
tests/e2e/test_deploy_process.py."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from service.logs import client_gone, wrap


@pytest.mark.parametrize(("line", "level", "source", "message"), [
    ("E0000 00:00:1796135327.425922   28645 cuda_platform.cc:52] failed call to cuInit: X",
     "ERROR", "cuda_platform.cc:52", "failed call to cuInit: X"),
    ("I0000 00:00:1796135323.801430   28645 port.cc:153] oneDNN custom operations are on.",
     "INFO", "port.cc:153", "oneDNN custom operations are on."),
    ("2025-01-01 00:00:00.000000: W tensorflow/core/util/x.cc:12] old format",
     "WARNING", "tensorflow/core/util/x.cc:12", "old format"),
])
def test_native_lines_become_objects_with_their_level_and_source(
        line: str, level: str, source: str, message: str) -> None:
    text, carried = wrap(line, "INFO")
    record = json.loads(text)
    assert (record["level"], record["source"], record["message"]) == (level, source, message)
    assert record["name"] == "native" and carried == level and record["time"]


def test_other_lines_are_wrapped_and_continuations_keep_the_level() -> None:
    levels = []
    level = "INFO"
    for line in ["WARNING: All log messages before absl::InitializeLog() is called",
                 "/x/y.py:3: UserWarning: careful",
                 "Traceback (most recent call last):",
                 '  File "x.py", line 1, in <module>',
                 "[1, 2]"]:
        text, level = wrap(line, level)
        record = json.loads(text)
        assert record["message"] == line and record["name"] == "stderr"
        levels.append(record["level"])
    assert levels == ["WARNING", "WARNING", "ERROR", "ERROR", "ERROR"]


def test_json_objects_pass_unchanged() -> None:
    line = '{"time": "t", "level": "INFO", "message": "already JSON"}'
    assert wrap(line, "ERROR") == (line, "ERROR")


def test_grpc_failing_to_answer_a_departed_client_is_not_an_error() -> None:
    """Regression: a cancelled or timed-out client made gRPC log an ERROR and a traceback
    ("ExecuteBatchError raised in core by servicer method") for every such call."""
    try:
        raise RuntimeError("send failed")
    except RuntimeError:
        exc_info = sys.exc_info()
    gone = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1,
                             "ExecuteBatchError raised in core by servicer method [%s]",
                             ("/inference.GRPCInferenceService/ModelInfer",), exc_info)
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert not client_gone(gone)  # dropped at INFO
        assert gone.levelname == "DEBUG" and gone.exc_info is None
        root.setLevel(logging.DEBUG)
        assert client_gone(gone)  # kept, one line, at DEBUG
        other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1,
                                  "Unexpected error in the server", (), None)
        assert client_gone(other) and other.levelname == "ERROR"
    finally:
        root.setLevel(level)
