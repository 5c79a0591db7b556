"""Soak: a real `tapserve serve` under mixed traffic for a set time, with model reloads.

    .venv/bin/python bench/soak.py --minutes 15 [--threads 6] [--out bench/out/soak.json]

Traffic, from client threads in this process (the stock clients):
- good requests through every door (KServe gRPC and HTTP, TF Serving gRPC and REST), each
  answer checked against Keras;
- bad ones (wrong dtype, unknown model, unknown output), which must get their status;
- requests with a deadline too short to meet, and requests the client cancels;
- every 20 s a new model version is copied in and swapped (poll mode), and now and then a
  broken version appears and is removed: no request may fail because of it.
Every 10 s the server's resident memory is sampled. At the end: answers by status,
unexpected ones, memory over time (growth after warm-up), and the server's own request
counts next to what the clients saw. Exits 1 on any unexpected answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import keras
import numpy as np
import tensorflow as tf
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

BENCH = Path(__file__).resolve().parent
DOORS = ("kserve_grpc", "kserve_http", "tfserving_grpc", "tfserving_http")
# Each kind of traffic below: the door its requests to model "m" go through, and how many.
SENT = [(door, 1) for door in DOORS] + [
    ("kserve_grpc", 2), ("kserve_grpc", 0), ("kserve_grpc", 0), ("tfserving_http", 1)]
TAPSERVE = Path(sys.executable).parent / "tapserve"
sys.path.insert(0, str(BENCH))
from load import read_metrics  # noqa: E402
from run import free_port  # noqa: E402


def model() -> keras.Model:
    keras.utils.set_random_seed(7)
    x = keras.Input(shape=(16,), name="x")
    h = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    return keras.Model(x, keras.layers.Dense(4, name="y")(h))


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repo = Path(tempfile.mkdtemp(prefix="soak-"))
        self.keras = model()
        # "m" takes everything whose server count must equal the client's; "late" the
        # requests that may die before the server sees them (an expired deadline, a cancel).
        for name in ("m", "late"):
            (self.repo / name / "1").mkdir(parents=True)
            self.keras.save(self.repo / name / "1" / "model.keras")
        self.grpc_port, self.http_port, self.metrics_port = (free_port() for _ in range(3))
        self.log = open(args.out.with_suffix(".log"), "w")  # noqa: SIM115
        self.server = subprocess.Popen(
            [str(TAPSERVE), "serve", "--model-repository", str(self.repo), "--host",
             "127.0.0.1", "--grpc-port", str(self.grpc_port), "--http-port",
             str(self.http_port), "--metrics-port", str(self.metrics_port),
             "--repository-poll-secs", "1", "--log-level", "WARNING"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.seen: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  # requests sent, by front door
        self.unexpected: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.rss: list[tuple[float, int]] = []

    def note(self, what: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.seen[what] += 1
            if not ok and len(self.unexpected) < 50:
                self.unexpected.append(f"{what}: {detail}"[:300])

    def wait_ready(self) -> None:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}") as client:
            for _ in range(600):
                try:
                    if client.is_server_ready():
                        return
                except InferenceServerException:
                    pass
                time.sleep(0.2)
        raise SystemExit("the server never became ready")

    def traffic(self, index: int) -> None:
        rng = np.random.default_rng(index)
        kserve = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")
        http = httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        tfs = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        while not self.stop.is_set():
            x = rng.random((int(rng.integers(1, 5)), 16), dtype=np.float32)
            want = np.asarray(self.keras(x))
            kind = int(rng.integers(8))
            door, sent = SENT[kind]
            with self.lock:
                self.sent[door] += sent
            try:
                if kind == 0:  # KServe gRPC, good
                    self.check("kserve_grpc OK", self.kserve(kserve, x), want)
                elif kind == 1:  # KServe HTTP (binary), good
                    self.check("kserve_http OK", self.kserve(http, x, httpclient), want)
                elif kind == 2:  # TF Serving gRPC, good
                    request = predict_pb2.PredictRequest()
                    request.model_spec.name = "m"
                    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
                    got = tf.make_ndarray(tfs.Predict(request, timeout=30).outputs["y"])
                    self.check("tfserving_grpc OK", got, want)
                elif kind == 3:  # TF Serving REST, good
                    status, answer = self.post("/v1/models/m:predict",
                                               {"instances": x.tolist()})
                    self.check(f"tfserving_http {status}", np.array(answer.get(
                        "predictions", []), dtype=np.float32), want)
                elif kind == 4:  # bad: each must get its own status
                    self.expect_error(kserve, "m", x.astype(np.float64), "INVALID_ARGUMENT")
                    self.expect_error(kserve, "ghost", x, "NOT_FOUND")  # counted as _unknown
                    self.expect_error(kserve, "m", x, "NOT_FOUND", outputs=["nope"])
                elif kind == 5:  # a deadline too short to meet
                    try:
                        self.kserve(kserve, x, timeout=0.0002, model="late")
                        self.note("deadline met anyway", True)
                    except InferenceServerException as exc:
                        self.note(f"short deadline {exc.status()}",
                                  "DEADLINE_EXCEEDED" in str(exc.status()), exc.message())
                elif kind == 6:  # the client cancels
                    done = threading.Event()
                    ctx = kserve.async_infer(
                        "late", inputs(x, grpcclient),
                        callback=lambda result, error, done=done: done.set())
                    ctx.cancel()
                    done.wait(5)
                    self.note("cancelled", True)
                else:  # HTTP error through the REST door
                    status, answer = self.post("/v1/models/m:predict", {"instances": [["a"]]})
                    self.note(f"tfserving_http {status}", status == 400, str(answer))
            except InferenceServerException as exc:
                self.note(f"error {exc.status()}", False, exc.message())
            except grpc.RpcError as exc:
                self.note(f"error {exc.code().name}", False, exc.details())
            except Exception as exc:  # anything else is a soak failure, recorded
                self.note(f"error {type(exc).__name__}", False, str(exc))
        kserve.close()
        http.close()
        channel.close()

    def kserve(self, client: object, x: np.ndarray, module: object = grpcclient,
               timeout: float | None = None, model: str = "m") -> np.ndarray:
        kwargs = {"client_timeout": timeout} if timeout else {}
        return client.infer(model, inputs(x, module), **kwargs).as_numpy("y")

    def expect_error(self, client: grpcclient.InferenceServerClient, name: str,
                     x: np.ndarray, code: str, outputs: list[str] | None = None) -> None:
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs or []] or None
        try:
            client.infer(name, inputs(x, grpcclient), outputs=requested)
            self.note(f"bad request {code} answered OK", False)
        except InferenceServerException as exc:
            self.note(f"bad {exc.status()}", code in str(exc.status()), exc.message())

    def check(self, what: str, got: np.ndarray, want: np.ndarray) -> None:
        ok = got.shape == want.shape and np.allclose(got, want, atol=1e-5)
        self.note(what if ok else f"{what} WRONG ANSWER", ok, f"{got!r} != {want!r}")

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                         data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def reloads(self) -> None:
        """A new version every 20 s (the old one drains); every third time a broken one
        first, which must change nothing, then is removed."""
        version = 1
        while not self.stop.wait(20):
            if version % 3 == 0:
                broken = self.repo / "m" / ".staging-broken"
                broken.mkdir()
                (broken / "model.keras").write_bytes(b"broken")
                broken.rename(self.repo / "m" / "999")
                time.sleep(3)
                shutil.rmtree(self.repo / "m" / "999")
            staging = self.repo / "m" / f".staging-{version + 1}"
            shutil.copytree(self.repo / "m" / str(version), staging)
            staging.rename(self.repo / "m" / str(version + 1))
            version += 1
            with self.lock:
                self.seen["reloads"] += 1

    def sample_memory(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(10):
            for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss.append((round(time.monotonic() - start), int(line.split()[1])))

    def run(self) -> dict:
        self.wait_ready()
        threads = [threading.Thread(target=self.traffic, args=(i,))
                   for i in range(self.args.threads)]
        threads += [threading.Thread(target=self.reloads), threading.Thread(
            target=self.sample_memory)]
        for t in threads:
            t.start()
        time.sleep(self.args.minutes * 60)
        self.stop.set()
        for t in threads:
            t.join(60)
        time.sleep(1)
        counts = read_metrics(f"http://127.0.0.1:{self.metrics_port}/metrics",
                              ["tapserve_requests_total"])
        self.server.terminate()
        code = self.server.wait(60)
        warm = [kb for t, kb in self.rss if t >= 60] or [kb for _, kb in self.rss]
        counted = {d: int(sum(v for k, v in counts.items()
                              if f'protocol="{d}"' in k and 'model="m"' in k)) for d in DOORS}
        return {
            # Every request a client sent to "m", counted once by the server under some code.
            "requests_server_vs_client": {d: [counted[d], self.sent[d]] for d in DOORS},
            "minutes": self.args.minutes, "threads": self.args.threads,
            "answers": dict(sorted(self.seen.items())), "unexpected": self.unexpected,
            "rss_mib": [(t, round(kb / 1024)) for t, kb in self.rss],
            "rss_growth_after_warmup": (warm[-1] - warm[0]) / warm[0] if warm else None,
            "server_counts": {k: v for k, v in counts.items() if v},
            "server_exit_code": code,
        }


def inputs(x: np.ndarray, module: object) -> list:
    tensor = module.InferInput("x", list(x.shape), np_to_triton_dtype(x.dtype))
    tensor.set_data_from_numpy(x)
    return [tensor]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "soak.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    soak = Soak(args)
    try:
        result = soak.run()
    finally:
        if soak.server.poll() is None:
            soak.server.kill()
        shutil.rmtree(soak.repo, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}, indent=2))
    print("rss MiB (s, MiB):", result["rss_mib"])
    counted = all(a == b for a, b in result["requests_server_vs_client"].values())
    sys.exit(1 if result["unexpected"] or result["server_exit_code"] != 0 or not counted
             else 0)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
