"""Closed-loop gRPC load for any KServe v2 server (Tapserve, MLServer, Triton/PyTriton).

    .venv/bin/python bench/load.py --target 127.0.0.1:8001 --spec SPEC.json \
        --concurrency 8 --warmup 3 --duration 10 --out result.json

SPEC.json is a list of request variants, each
`{"model_name": ..., "inputs": [{"name", "datatype", "shape"}], "outputs": [names]}`.
Each variant's ModelInferRequest is serialized once (random data from a fixed seed,
`raw_input_contents`) and sent as bytes through a generic unary-unary call, so no
server's generated code is imported (tritonclient's messages only build the bytes).
`--concurrency` workers each keep one request in flight. With several variants, each
request is one of them drawn at random (`--mix random`, seeded: independent callers of
mixed endpoints), or worker i always sends variant i mod n (`--mix fixed`: one client
per endpoint). Taking the variants in turn would make the workers move between
endpoints in lockstep, which no real traffic does.

Runs in its own process, never beside a server: the client must not take the server's
GIL. Requests that complete inside the measured window count; latencies are per request.
With `--metrics-url`, the server's Prometheus text is read at the window's start and end;
with `--server-pid`, the CPU seconds of that process and its children over the window;
always, the client's own CPU and the whole machine's, so what else ran is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8}


def build_request(variant: dict, rng: np.random.Generator) -> bytes:
    """One variant's ModelInferRequest, serialized."""
    request = service_pb2.ModelInferRequest(model_name=variant["model_name"])
    for spec in variant["inputs"]:
        request.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        data = rng.random(spec["shape"]).astype(DTYPES[spec["datatype"]])
        request.raw_input_contents.append(data.tobytes())
    for name in variant.get("outputs", []):
        request.outputs.add(name=name)
    return request.SerializeToString()


def describe_response(raw: bytes) -> dict:
    """What a response holds: output names, shapes, and whether the data came raw."""
    response = service_pb2.ModelInferResponse.FromString(raw)
    return {"model_name": response.model_name,
            "outputs": {o.name: list(o.shape) for o in response.outputs},
            "raw_output_contents": len(response.raw_output_contents) > 0}


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and every living descendant."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
        children.setdefault(ppid, []).append(int(entry))
        stats[int(entry)] = (utime + stime) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total


def machine_cpu() -> float:
    """CPU seconds every core of the machine spent busy (not idle or iowait) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def read_metrics(url: str, prefixes: list[str]) -> dict[str, float]:
    """The samples of a Prometheus text page whose names start with one of `prefixes`."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not any(line.startswith(p) for p in prefixes):
            continue
        key, _, value = line.rpartition(" ")
        try:
            samples[key] = float(value)
        except ValueError:
            continue
    return samples


class Window:
    """The measured interval, and what was seen inside it."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.latencies: list[float] = []
        self.rows = 0
        self.errors: dict[str, int] = {}


async def worker(index: int, call: grpc.aio.UnaryUnaryMultiCallable, requests: list[bytes],
                 rows: list[int], window: Window, stop: float, timeout: float,
                 mix: str, seed: int) -> None:
    rng = np.random.default_rng([seed, index])
    i = index % len(requests)
    while True:
        if mix == "random":
            i = int(rng.integers(len(requests)))
        started = time.perf_counter()
        if started >= stop:
            return
        try:
            await call(requests[i], timeout=timeout)
            code = None
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        done = time.perf_counter()
        if window.start <= started and done <= window.end:
            if code is None:
                window.latencies.append(done - started)
                window.rows += rows[i]
            else:
                window.errors[code] = window.errors.get(code, 0) + 1
        elif code is not None and started < window.start:
            window.errors[f"warmup:{code}"] = window.errors.get(f"warmup:{code}", 0) + 1


async def run(args: argparse.Namespace) -> dict:
    variants = json.loads(Path(args.spec).read_text())
    rng = np.random.default_rng(args.seed)
    requests = [build_request(v, rng) for v in variants]
    rows = [v["inputs"][0]["shape"][0] for v in variants]
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        # One of each first: a wrong request fails here, loudly, not as a slow run.
        seen = [describe_response(await call(r, timeout=args.timeout)) for r in requests]
        now = time.perf_counter()
        window = Window(now + args.warmup, now + args.warmup + args.duration)
        stop = window.end
        workers = [asyncio.create_task(worker(i, call, requests, rows, window, stop,
                                              args.timeout, args.mix, args.seed))
                   for i in range(args.concurrency)]
        await asyncio.sleep(max(window.start - time.perf_counter(), 0))
        before = snapshot(args)
        await asyncio.sleep(max(window.end - time.perf_counter(), 0))
        after = snapshot(args)
        await asyncio.gather(*workers)
    lat = np.array(window.latencies) * 1000
    seconds = args.duration
    result = {
        "target": args.target,
        "concurrency": args.concurrency,
        "mix": args.mix if len(requests) > 1 else None,
        "duration_s": seconds,
        "warmup_s": args.warmup,
        "requests": len(lat),
        "req_per_s": len(lat) / seconds,
        "rows_per_s": window.rows / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p90_ms": float(np.percentile(lat, 90)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "errors": window.errors,
        "client_cpu_cores": (after["client_cpu"] - before["client_cpu"]) / seconds,
        "machine_cpu_cores": (after["machine_cpu"] - before["machine_cpu"]) / seconds,
        "responses": seen,
    }
    if args.server_pid:
        result["server_cpu_cores"] = (after["server_cpu"] - before["server_cpu"]) / seconds
    if args.metrics_url:
        result["metrics_before"] = before["metrics"]
        result["metrics_after"] = after["metrics"]
    return result


def snapshot(args: argparse.Namespace) -> dict:
    shot: dict = {"client_cpu": time.process_time(), "machine_cpu": machine_cpu()}
    if args.server_pid:
        shot["server_cpu"] = process_tree_cpu(args.server_pid)
    if args.metrics_url:
        shot["metrics"] = read_metrics(args.metrics_url, args.metric_prefix)
    return shot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--spec", required=True, help="JSON list of request variants")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=["random", "fixed"], default="random",
                        help="how workers pick among several request variants")
    parser.add_argument("--metrics-url")
    parser.add_argument("--metric-prefix", action="append", default=[])
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
