"""How long health waits while the server decodes one large typed-contents request.

    PYTHONPATH=. .venv/bin/python bench/decode_stall.py [--mib 60] [--kind fp32|float_val|bytes]

Starts `tapserve serve` on a model taking [rows, any] inputs, sends one request of about
`--mib` MiB as KServe `fp32_contents`, TF Serving `float_val`, or KServe `bytes_contents`
(a BYTES input), and meanwhile times ServerLive calls (every 10 ms); `--decode-only` asks
for an output that does not exist, so the request is decoded, then refused before any
compute. Prints the request's
seconds and its status, and the longest and median ServerLive latency. A decode that holds
the GIL shows as a long ServerLive; one that offers it between chunks does not.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import keras
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = 1024  # the default max_queue_size: the most rows a request may carry


def write_models(repo: Path) -> None:
    x = keras.Input(shape=(None,), name="x")
    mean = keras.layers.GlobalAveragePooling1D()(keras.layers.Reshape((-1, 1))(x))
    (repo / "floats" / "1").mkdir(parents=True)
    keras.Model(x, mean).save(repo / "floats" / "1" / "model.keras")
    text = keras.Input(shape=(None,), dtype="string", name="text")
    length = keras.layers.StringLookup(vocabulary=["a"], name="lookup")(text)
    (repo / "strings" / "1").mkdir(parents=True)
    keras.Model(text, length).save(repo / "strings" / "1" / "model.keras")


def request(kind: str, mib: int, decode_only: bool) -> tuple[str, bytes]:
    """(method, serialized request) of about `mib` MiB."""
    from tritonclient.grpc import service_pb2
    width = mib * 2**20 // 4 // ROWS
    if kind == "float_val":
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2
        msg = predict_pb2.PredictRequest()
        msg.model_spec.name = "floats"
        dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in (ROWS, width)]
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims))
        tensor.float_val.extend(np.ones(ROWS * width, np.float32).tolist())
        msg.inputs["x"].CopyFrom(tensor)
        if decode_only:
            msg.output_filter.append("nope")
        return "/tensorflow.serving.PredictionService/Predict", msg.SerializeToString()
    msg = service_pb2.ModelInferRequest(model_name="floats" if kind == "fp32" else "strings")
    if kind == "fp32":
        tensor = msg.inputs.add(name="x", datatype="FP32", shape=[ROWS, width])
        tensor.contents.fp32_contents.extend(np.ones(ROWS * width, np.float32).tolist())
    else:  # 4-byte elements: as many as the floats
        tensor = msg.inputs.add(name="text", datatype="BYTES", shape=[ROWS, width])
        tensor.contents.bytes_contents.extend([b"abcd"] * (ROWS * width))
    if decode_only:
        msg.outputs.add(name="nope")
    return "/inference.GRPCInferenceService/ModelInfer", msg.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=60)
    parser.add_argument("--kind", choices=["fp32", "float_val", "bytes"], default="fp32")
    parser.add_argument("--decode-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        write_models(repo)
        method, body = request(args.kind, args.mib, args.decode_only)
        log = open(repo / "log", "wb")  # noqa: SIM115 - read while the server runs
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo),
             "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
             "--http-port", "0"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            url = wait_bound(repo / "log", server)
            measure(url, method, body)
        finally:
            server.terminate()
            server.wait(60)


def wait_bound(log: Path, server: subprocess.Popen) -> str:
    import re
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        match = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if match:
            url = f"127.0.0.1:{match[1]}"
            with grpc.insecure_channel(url) as channel:
                ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
                while ready(b"", timeout=10) != b"\x08\x01":
                    time.sleep(0.2)
            return url
        time.sleep(0.2)
    raise RuntimeError(log.read_text(errors="replace"))


def measure(url: str, method: str, body: bytes) -> None:
    options = [("grpc.max_send_message_length", 256 * 2**20),
               ("grpc.max_receive_message_length", 256 * 2**20)]
    with grpc.insecure_channel(url, options=options) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        call = channel.unary_unary(method)
        outcome: dict[str, object] = {}

        def send() -> None:
            started = time.monotonic()
            try:
                call(body, timeout=300)
                outcome["status"] = "OK"
            except grpc.RpcError as exc:
                outcome["status"] = f"{exc.code().name}: {exc.details()[:120]}"
            outcome["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=send)
        latencies = []
        thread.start()
        while thread.is_alive():
            started = time.monotonic()
            live(b"", timeout=60)
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
        thread.join()
    print(f"request of {len(body) / 2**20:.1f} MiB: {outcome['seconds']:.2f} s, "
          f"{outcome['status']}")
    print(f"ServerLive during it: {len(latencies)} calls, max {max(latencies) * 1000:.0f} ms, "
          f"median {statistics.median(latencies) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
