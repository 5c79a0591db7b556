"""Black-box fixtures (see stock.py): a real `tapserve serve` process per use."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import pytest
import zoo
from stock import ServerProcess


@pytest.fixture(scope="session")
def start_process(tmp_path_factory: pytest.TempPathFactory):
    """`start_process(repository, *flags, client_options=None, **env)`: every server is
    stopped at the end."""
    processes: list[ServerProcess] = []

    def start(repository: Path, *flags: str, ready: bool = True,
              client_options: dict | None = None, **env: str) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "tapserve.log"
        processes.append(ServerProcess(repository, log, *flags, client_options=client_options,
                                       **env))
        if ready:
            processes[-1].wait_ready()
        return processes[-1]

    yield start
    for process in processes:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait(10)


@pytest.fixture(scope="session")
def write_examples(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], None]:
    """`write_examples(repository)`: the example models (zoo.write_examples), trained once
    a session (a minute of training each time, else) and copied into each repository."""
    built = tmp_path_factory.mktemp("examples")
    zoo.write_examples(built)

    def write(repository: Path) -> None:
        for model in built.iterdir():
            shutil.copytree(model, repository / model.name)
    return write


@pytest.fixture(scope="module")
def autoencoder(repository: Path) -> keras.Model:
    """The zoo autoencoder the module's `repository` serves, as Keras computes it."""
    return keras.models.load_model(repository / "autoencoder" / "1" / "model.keras")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "frontend_only: the front doors only (transport, limits, security, "
        "drain, tracing, storage, docs, deploy): the same on every backend, so the JAX run "
        "deselects it (-m 'not frontend_only')")


@pytest.fixture(scope="session")
def backend() -> str:
    """The backend the e2e servers run on (TAPSERVE_BACKEND, default tensorflow)."""
    from backends import BACKEND  # not at import: the marker is registered first

    return BACKEND
