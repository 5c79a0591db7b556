"""A load/unload storm against one model, and how long another model's health checks take
meanwhile (issue 18.17: loads and the collection after each unload hold the GIL).

    .venv/bin/python bench/storm.py [--cycles 15] [--out bench/out/storm.json]

A real `tapserve serve` (explicit mode) serves "steady"; a client thread loads and unloads
"storm" `--cycles` times while another asks ModelReady("steady") back to back. Prints the
ModelReady latency percentiles with the storm off (before it starts) and on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tritonclient.grpc as grpcclient

TAPSERVE = Path(sys.executable).parent / "tapserve"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import free_port  # noqa: E402


def model(layers: int) -> keras.Model:
    x = keras.Input(shape=(16,), name="x")
    h = x
    for i in range(layers):
        h = keras.layers.Dense(16, activation="relu", name=f"d{i}")(h)
    return keras.Model(x, h)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 1)}


def checks(client: grpcclient.InferenceServerClient, stop: threading.Event,
           out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        assert client.is_model_ready("steady")
        out.append(time.perf_counter() - started)
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=15)
    parser.add_argument("--layers", type=int, default=20, help="Dense layers of each model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for name in ("steady", "storm"):
            (repo / name / "1").mkdir(parents=True)
            model(args.layers).save(repo / name / "1" / "model.keras")
        port = free_port()
        with open(repo / "server.log", "wb") as log:
            proc = subprocess.Popen(
                [str(TAPSERVE), "serve", "--model-repository", str(repo), "--host",
                 "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0", "--http-port",
                 "0", "--model-control-mode", "explicit", "--load-model", "steady"],
                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.is_server_ready():
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit((repo / "server.log").read_text())
                time.sleep(0.2)
            quiet: list[float] = []
            stop = threading.Event()
            prober = threading.Thread(target=checks, args=(client, stop, quiet))
            prober.start()
            time.sleep(3)
            stop.set()
            prober.join()
            storm: list[float] = []
            stop = threading.Event()
            prober = threading.Thread(target=checks, args=(client, stop, storm))
            loader = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            prober.start()
            started = time.monotonic()
            for _ in range(args.cycles):
                loader.load_model("storm")
                loader.unload_model("storm")
            storm_s = time.monotonic() - started
            time.sleep(1)  # what an unload left to do afterwards counts too
            stop.set()
            prober.join()
            result = {"quiet": percentiles(quiet), "storm": percentiles(storm),
                      "cycles": args.cycles, "storm_s": round(storm_s, 1)}
            print(json.dumps(result, indent=1))
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
