"""Test session set-up. Two sessions, because one process cannot hold both tritonclient's
generated `inference.*` protobuf messages and ours (protobuf refuses duplicate symbols):

- `pytest`        : everything in-process (graph, batcher, protocol, a TapServer on a thread
                    called through our own generated stubs, deploy checks);
- `pytest --e2e`  : tests/e2e only: `tapserve serve` in a subprocess, called with the stock
                    tritonclient, as users call it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite's backend, as the server's: TAPSERVE_BACKEND (default tensorflow). Keras reads
# KERAS_BACKEND at its first import, which comes after this file; e2e servers inherit it.
BACKEND = os.environ.get("TAPSERVE_BACKEND", "tensorflow")
os.environ["KERAS_BACKEND"] = BACKEND
if BACKEND == "jax":  # as service.backends.select does for the server
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

E2E = Path(__file__).parent / "e2e"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--e2e", action="store_true",
                     help="run tests/e2e (server subprocess + stock tritonclient) instead")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    in_e2e = collection_path == E2E or E2E in collection_path.parents
    if in_e2e != config.getoption("--e2e") and collection_path != Path(__file__).parent:
        return True
    return None


@pytest.fixture(scope="session")
def start_server(request: pytest.FixtureRequest):
    """In-process servers: `start_server(repository, **settings)`; all stop at the end."""
    from harness import RunningServer  # imports our protos: never in the --e2e session

    servers: list[RunningServer] = []

    def start(repository: Path, **kwargs: object) -> RunningServer:
        servers.append(RunningServer(repository, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop(grace=1.0)
