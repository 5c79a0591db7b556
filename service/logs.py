"""Log set-up: one line per event, as text or JSON (python-json-logger).

What native code writes to file descriptor 2 (TensorFlow's and absl's C++ logging) does
not pass through Python's logging, so fd 2 becomes a pipe that a thread reads. It drops
the start-up lines a user cannot act on (`failed call to cuInit` on every CPU host, oneDNN
and CPU-feature notes: the server logs which devices it uses itself) unless the log level
is DEBUG and, in JSON mode,
wraps each line that is not already a JSON object into one, for log shippers that parse
each line. The original stderr stays the one place lines go.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
RENAME = {"levelname": "level", "asctime": "time"}

# absl / TensorFlow C++ prefixes: `E0000 00:00:1796135327.425922   28645 file.cc:52] msg`
# (absl) and `2025-01-01 00:00:00.000000: W tensorflow/core/x.cc:12] msg` (TF's own).
NATIVE = re.compile(
    r"^(?:(?P<absl>[IWEF])\d{4} [\d:.]+\s+\d+|[\d-]+ [\d:.]+: (?P<tf>[IWEF]))"
    r"\s+(?P<source>[^\s\]]+:\d+)\] ?(?P<message>.*)$")
CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
# absl's `WARNING: All log messages before absl::InitializeLog() ...`, Python's warnings.
NAMED = re.compile(r"^(?:\S+: )?(INFO|WARNING|ERROR|CRITICAL|FATAL)\b")
# Native start-up lines that say nothing a user can act on: no GPU on a CPU host (the
# server logs its devices), oneDNN and CPU-feature notes, absl's note about itself.
NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
    "TF-TRT Warning: Could not find TensorRT",
)


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Call before TensorFlow is imported: its C++ start-up lines come at import."""
    # TensorFlow's C++ INFO and WARNING start-up chatter (oneDNN, CPU features) is not
    # ours to print; its errors still come, as JSON objects in JSON mode.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stream = _relay_native_stderr(as_json=fmt == "json", quiet=level.upper() != "DEBUG")
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields=RENAME))
    else:
        handler.setFormatter(OneLineFormatter(TEXT_FORMAT))
    handler.addFilter(client_gone)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # TensorFlow's Python warnings (e.g. "retracing" while every endpoint compiles at load)
    # are about its internals, not the server's events.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # JAX's INFO lines about platforms it probes and does not find ("Unable to initialize
    # backend 'tpu'") on every host: the server logs the devices it found.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def client_gone(record: logging.LogRecord) -> bool:
    """gRPC logs an ERROR with a traceback when it cannot send an answer because its client
    already went away (a cancel, an expired deadline): the client's doing, not a fault of
    the server's, and one line per cancelled call would drown real errors. It stays, as
    a one-line DEBUG record."""
    if record.name.startswith("grpc._cython") and "ExecuteBatchError" in record.getMessage():
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


class OneLineFormatter(logging.Formatter):
    """Text lines whose message has its control characters escaped: a client string with
    a newline (a request id) must not forge a log line. A traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return CONTROL.sub(lambda m: repr(m[0])[1:-1], super().formatMessage(record))


def wrap(line: str, level: str) -> tuple[str, str]:
    """One stderr line as a JSON object (unchanged if it already is one), and the level
    the next unprefixed line inherits (a continuation line, a traceback's frames)."""
    try:
        if isinstance(json.loads(line), dict):
            return line, level
    except ValueError:
        pass
    record = {"time": _now(), "level": level, "name": "stderr", "message": line}
    if match := NATIVE.match(line):
        level = LEVELS[match["absl"] or match["tf"]]
        record.update(level=level, name="native", source=match["source"],
                      message=match["message"])
    elif line.startswith("Traceback (most recent call last)"):
        level = record["level"] = "ERROR"
    elif match := NAMED.match(line):
        level = record["level"] = "CRITICAL" if match[1] == "FATAL" else match[1]
    elif "Warning: " in line:  # Python's warnings module: `file.py:3: UserWarning: ...`
        level = record["level"] = "WARNING"
    return json.dumps(record), level


def _now() -> str:
    # The same shape as logging's asctime in the Python records: 2025-01-01 12:00:00,123
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


def noise(line: str) -> bool:
    """Whether a native stderr line is start-up chatter no user can act on (NOISE)."""
    return any(text in line for text in NOISE)


def _relay_native_stderr(as_json: bool, quiet: bool) -> _Locked:
    """Point fd 2 at a pipe relayed (without NOISE if `quiet`; as JSON objects if
    `as_json`); return a text stream on the real stderr for the log handler."""
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    # Python's own writes to sys.stderr (warnings, a traceback) go to fd 2, so through
    # the relay too; only the log handler writes to the real stderr directly.
    out = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
    lock = threading.Lock()  # the relay and the log handler share `out`

    def relay() -> None:
        level, pending = "WARNING", b""
        while chunk := os.read(read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                level = emit(raw, level)
        emit(pending, level)
        os.close(read)

    def emit(raw: bytes, level: str) -> str:
        line = raw.decode("utf-8", "replace").rstrip()
        if not line.strip() or (quiet and noise(line)):
            return level
        text = line
        if as_json:
            text, level = wrap(line, level)
        with lock:
            out.write(text + "\n")
        return level

    thread = threading.Thread(target=relay, name="stderr-relay", daemon=True)
    thread.start()

    def drain() -> None:
        # At exit: close the pipe's last write end (fd 2) so the relay reads to the end.
        sys.stderr.flush()
        os.dup2(real, 2)
        thread.join(timeout=2)

    atexit.register(drain)
    return _Locked(out, lock)


class _Locked:
    """The real stderr for the log handler, serialised with the relay's writes."""

    def __init__(self, stream: TextIO, lock: threading.Lock) -> None:
        self.stream, self.lock = stream, lock

    def write(self, text: str) -> int:
        with self.lock:
            return self.stream.write(text)

    def flush(self) -> None:
        with self.lock:
            self.stream.flush()
