"""Log set-up: one line per event, as text or JSON (python-json-logger)."""

from __future__ import annotations

import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # TensorFlow's Python warnings (e.g. "retracing" while every endpoint compiles at load)
    # are about its internals, not the server's events.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # TensorFlow's C++ start-up chatter is not ours to print.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
