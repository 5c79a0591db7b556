"""Black-box helpers: `tapserve serve` in a subprocess on 127.0.0.1, the stock tritonclient."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scrape
import tritonclient.grpc as triton
from tritonclient.utils import np_to_triton_dtype

TAPSERVE = Path(sys.executable).parent / "tapserve"


def server_has(module: str) -> bool:
    """Whether the `tapserve` the tests start can import `module`: the container image's
    holds the server's dependencies, not its extras (s3, gcs, tracing)."""
    python = TAPSERVE.resolve().parent / "python"
    return subprocess.run([str(python), "-c", f"import {module}"],
                          capture_output=True).returncode == 0


BOUND = re.compile(r"serving gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)")


class ServerProcess:
    """`tapserve serve` on free ports; its log goes to a file the test can read.

    With `repository=None` nothing but `flags` is passed: the rest comes from `env`
    (`TAPSERVE_*`), so the env twins of the flags can be tested. `client_options` go to
    tritonclient's InferenceServerClient (`ssl=True`, certificates) for a TLS port."""

    def __init__(self, repository: Path | None, log: Path, *flags: str,
                 client_options: dict | None = None, **env: str) -> None:
        self.log = log
        self.client_options = client_options or {}
        command = [str(TAPSERVE), "serve"]
        if repository is not None:  # defaults first: a test's own flags win
            command += ["--model-repository", str(repository), "--host", "127.0.0.1",
                        "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0"]
        command += flags
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **env})
        deadline = time.monotonic() + 60
        while not (match := BOUND.search(self.output())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"tapserve did not start:\n{self.output()}")
            time.sleep(0.05)
        self.grpc_port, self.metrics_port = int(match[1]), int(match[2])
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.url, **self.client_options)

    def wait_ready(self, timeout: float = 300) -> None:
        # On jax a version compiles its batch-size ladder before it serves: a repository of
        # a dozen models takes minutes on a small, busy machine.
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while not client.is_server_ready():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tapserve never became ready:\n{self.output()}")
                time.sleep(0.1)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value from GET /metrics; None if no sample has those labels."""
        return scrape.metric(self.metrics_url, name, **labels)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def infer_inputs(feeds: dict[str, np.ndarray]) -> list[triton.InferInput]:
    """The stock client's input tensors for `feeds`, the way a user writes them."""
    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def requested(outputs: list[str] | None) -> list[triton.InferRequestedOutput] | None:
    return [triton.InferRequestedOutput(o) for o in outputs] if outputs else None


def infer(client: triton.InferenceServerClient, model: str, feeds: dict[str, np.ndarray],
          outputs: list[str] | None = None, **kwargs: object) -> triton.InferResult:
    """One ModelInfer through the stock client, the way a user writes it."""
    return client.infer(model, infer_inputs(feeds), outputs=requested(outputs), **kwargs)
