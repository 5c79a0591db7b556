"""A real TapServer on 127.0.0.1, in this process on its own thread and event loop,
called through our generated stubs (wire-identical to every KServe v2 client)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import scrape

from service.protocol import convert
from service.protocol.datatypes import to_kserve
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.protocol.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from service.server import TapServer
from service.settings import Settings
from service.types import InferResponse


class RunningServer:
    """A TapServer on a background thread; `url` is what clients dial."""

    def __init__(self, repository: Path, wait_loaded: bool = True, **settings: object) -> None:
        self.settings = Settings(**{
            "model_repository": repository, "host": "127.0.0.1", "grpc_port": 0,
            "metrics_port": 0, "http_port": 0, **settings})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = TapServer(self.settings)
        self.call(self.server.start())
        if wait_loaded:
            self.call(self.server.loaded())
        self.url = f"127.0.0.1:{self.server.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        self.channel = grpc.insecure_channel(self.url)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def call(self, coro: object, timeout: float = 120) -> object:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
              timeout: float | None = 30) -> dict[str, np.ndarray]:
        """ModelInfer with raw contents; returns the outputs as numpy arrays."""
        request = pb.ModelInferRequest(model_name=model)
        for name, array in feeds.items():
            request.inputs.add(name=name, datatype=to_kserve(array.dtype), shape=list(array.shape))
            request.raw_input_contents.append(_raw(array))
        for name in outputs or []:
            request.outputs.add(name=name)
        response = self.stub.ModelInfer(request, timeout=timeout)
        return decode_response(response).outputs

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from GET /metrics (0 if absent)."""
        return scrape.metric(self.metrics_url, name, **labels) or 0.0

    def stop(self, grace: float = 5.0) -> None:
        if not self.loop.is_running():
            return
        self.channel.close()
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _raw(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(len(b).to_bytes(4, "little") + b for b in array.ravel())
    return np.ascontiguousarray(array).tobytes()


def decode_response(response: pb.ModelInferResponse) -> InferResponse:
    """The response's raw outputs as numpy arrays (the client side of the conversion)."""
    request = pb.ModelInferRequest(model_name=response.model_name)
    for out in response.outputs:
        request.inputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
    request.raw_input_contents.extend(response.raw_output_contents)
    decoded = convert.decode_infer_request(request)
    return InferResponse(response.model_name, "", 0, decoded.inputs, response.id)
