"""`tapserve serve` and `tapserve inspect`. Flags come from the Settings model's fields."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service import backends, validation
from service.backends import Backend
from service.errors import ConfigError, TapserveError
from service.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapserve", description="Serve Keras functional models: endpoints, submodels, taps.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model repository over gRPC")
    for name, field in Settings.model_fields.items():
        env = f"TAPSERVE_{name.upper()}"
        default = field.get_default(call_default_factory=True, validated_data={})
        kind: dict[str, Any] = {}
        if field.annotation is bool:  # --allow-model-code / --no-allow-model-code
            kind = {"action": argparse.BooleanOptionalAction}
        elif isinstance(default, list):  # repeatable
            kind = {"action": "append"}
        # argparse %-formats help text: a literal % in a description must be doubled.
        text = f"{field.description} (env {env}; default {default})".replace("%", "%%")
        serve.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, **kind,
                           help=text)
    inspect = commands.add_parser(
        "inspect", help="print a model's inputs, outputs, taps and endpoints")
    inspect.add_argument("path", type=Path, help="a model file, version folder or model folder")
    return parser


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the server's event loop: uvloop's (auto: where installed), or None for
    asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--event-loop uvloop: uvloop is not installed "
                                "(pip install uvloop; not available on Windows)") from None
        return None
    return uvloop.new_event_loop


def _flag(loc: tuple[int | str, ...]) -> str:
    name = str(loc[0])
    return f"--{name.replace('_', '-')} (env TAPSERVE_{name.upper()})"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # TensorFlow reads this when imported: quiet its C++ start-up lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "inspect":
        if not args.path.exists():  # say so before TensorFlow's seconds of start-up
            print(f"tapserve inspect: {args.path} does not exist", file=sys.stderr)
            return 2
        from service import logs

        logs.configure("text", "WARNING")  # quiets TensorFlow's start-up lines (service/logs)
        try:
            backend: Backend = ("jax" if os.environ.get("TAPSERVE_BACKEND") == "jax"
                                else "tensorflow")
            backends.select(backend)
            from service.inspect import describe

            print(describe(args.path, backend))
        except TapserveError as exc:
            print(f"tapserve inspect: {exc}", file=sys.stderr)
            return 2
        return 0

    flags = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        print(f"tapserve serve: {validation.describe(exc, Settings, _flag)}", file=sys.stderr)
        return 2
    from service import logs

    # Before the server's imports bring TensorFlow in: its C++ start-up lines must find
    # the log set-up in place (JSON mode relays them as JSON objects).
    logs.configure(settings.log_format, settings.log_level)
    try:
        backends.select(settings.backend, settings.gpu_memory_limit_mb)  # before keras
        from service.server import run

        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(run(settings))
    except (TapserveError, OSError) as exc:  # a missing repository, a port in use
        logging.getLogger("tapserve").error("cannot start: %s", exc)
        return 2
    # Drained: a late signal (the loop has let go of its handlers) must not turn a clean
    # exit into a killed one while the interpreter shuts TensorFlow down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
