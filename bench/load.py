"""Closed-loop load for any KServe v2 server (Tapserve, MLServer, Triton/PyTriton).

`--door` picks the front door: KServe v2 over gRPC (the default) or HTTP (binary tensor
data extension), or TF Serving's gRPC Predict or REST `:predict` (JSON, columnar); the
same variants, so doors compare side by side. `kserve_grpc_stream` sends the same
ModelInfer bytes over ModelStreamInfer: the `--concurrency` requests in flight share
`--streams` bidirectional streams (default 1), each request tagged with its own id so its
answer finds it (answers come back in any order).

    .venv/bin/python bench/load.py --target 127.0.0.1:8001 --spec SPEC.json \
        --concurrency 8 --warmup 3 --duration 10 --out result.json

SPEC.json is a list of request variants, each
`{"model_name": ..., "inputs": [{"name", "datatype", "shape"}], "outputs": [names]}`,
optionally with `"pool": P` (P different input blocks, default 1) and `"data": KEY`
(variants with the same key send the same blocks: the same images to other endpoints).
Each request is serialized once per block (random data from a fixed seed,
`raw_input_contents`) and sent as bytes through a generic unary-unary call, so no
server's generated code is imported (tritonclient's messages only build the bytes).
Worker w's k-th request takes block (w + k * concurrency) mod P: with P a multiple of
`--concurrency`, the requests in flight never carry the same block, so a server that
computes identical rows once gains nothing it would not gain on real, distinct traffic.
`--concurrency` workers each keep one request in flight. With several variants, each
request is one of them drawn at random (`--mix random`, seeded: independent callers of
mixed endpoints), or worker i always sends variant i mod n (`--mix fixed`: one client
per endpoint). Taking the variants in turn would make the workers move between
endpoints in lockstep, which no real traffic does. `--mix fanout`: each worker draws a
data key and sends one block to every variant of that key at once (one event asked of
several endpoints by several services), so it keeps that many requests in flight.

`--rate R` makes the load open-loop instead: requests arrive at R per second on average
(Poisson: exponential gaps, seeded), whatever the server's answers do, as independent
users' traffic does; `--concurrency` then only spaces the blocks. A request's latency is
counted from when it was due, not when the client got round to sending it, so a client
that falls behind shows up as latency (no coordinated omission). Timers fire at the
event loop's 1 ms resolution, so arrivals come in bursts of about a millisecond.

Runs in its own process, never beside a server: the client must not take the server's
GIL. Requests that complete inside the measured window count; latencies are per request.
With `--metrics-url`, the server's Prometheus text is read at the window's start and end;
with `--server-pid`, the CPU seconds of that process and its children over the window;
always, the client's own CPU and the whole machine's, so what else ran is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

try:
    from tritonclient.grpc import service_pb2
except ImportError:  # no tritonclient (scripts/device-check.sh): the same messages,
    # generated in the project from the same proto
    from service.protocol.generated import grpc_predict_v2_pb2 as service_pb2

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
DOORS = ("kserve_grpc", "kserve_grpc_stream", "tfserving_grpc", "kserve_http", "tfserving_http")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8}


def random_inputs(variant: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One block of a variant's inputs."""
    return {spec["name"]: rng.random(spec["shape"]).astype(DTYPES[spec["datatype"]])
            for spec in variant["inputs"]}


def build_request(variant: dict, data: dict[str, np.ndarray]) -> bytes:
    """One variant's ModelInferRequest carrying `data`, serialized."""
    request = service_pb2.ModelInferRequest(model_name=variant["model_name"])
    for spec in variant["inputs"]:
        request.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        request.raw_input_contents.append(data[spec["name"]].tobytes())
    for name in variant.get("outputs", []):
        request.outputs.add(name=name)
    return request.SerializeToString()


def build_payload(door: str, variant: dict, data: dict[str, np.ndarray]) -> bytes:
    """One variant carrying `data` as the door's request body, serialized once."""
    if door.startswith("kserve_grpc"):
        return build_request(variant, data)
    model, _, endpoint = variant["model_name"].partition(".")
    outputs = variant.get("outputs", [])
    if door == "tfserving_grpc":  # imported here: it brings TensorFlow's protos
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(output_filter=outputs)
        request.model_spec.name, request.model_spec.signature_name = model, endpoint
        for name, array in data.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        return request.SerializeToString()
    if door == "tfserving_http":
        return json.dumps({"signature_name": endpoint, "output_filter": outputs,
                           "inputs": {n: a.tolist() for n, a in data.items()}}).encode()
    header = {"inputs": [{"name": spec["name"], "datatype": spec["datatype"],
                          "shape": spec["shape"],
                          "parameters": {"binary_data_size": data[spec["name"]].nbytes}}
                         for spec in variant["inputs"]],
              "parameters": {"binary_data_output": True}}
    if outputs:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(a.tobytes() for a in data.values())


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


Send = Callable[[int], Awaitable[str | None]]  # request i -> None, or its error code


@dataclass
class Plan:
    """The serialized requests, one per (variant, block), and which variants go together."""

    payloads: list[bytes]
    ids: list[list[int]]  # per variant, its payload's index per block
    rows: list[int]  # per payload
    groups: list[list[int]]  # variants sent at once: one each, or (fanout) per data key
    pools: list[int]  # per group, how many blocks it has


def make_plan(door: str, variants: list[dict], mix: str, rng: np.random.Generator) -> Plan:
    keys = [v.get("data", f"#{i}") for i, v in enumerate(variants)]  # none: its own data
    blocks: dict[str, list[dict[str, np.ndarray]]] = {}
    plan = Plan([], [], [], [], [])
    for key, variant in zip(keys, variants, strict=True):
        if key not in blocks:  # the first variant of a key sets its pool
            blocks[key] = [random_inputs(variant, rng) for _ in range(variant.get("pool", 1))]
        plan.ids.append([])
        for data in blocks[key]:
            plan.ids[-1].append(len(plan.payloads))
            plan.payloads.append(build_payload(door, variant, data))
            plan.rows.append(variant["inputs"][0]["shape"][0])
    if mix == "fanout":
        plan.groups = [[v for v, k in enumerate(keys) if k == key] for key in blocks]
    else:
        plan.groups = [[v] for v in range(len(variants))]
    plan.pools = [len(plan.ids[g[0]]) for g in plan.groups]
    return plan


async def worker(index: int, send: Send, plan: Plan, window: Window, stop: float,
                 mix: str, seed: int, concurrency: int) -> None:
    rng = np.random.default_rng([seed, index])
    group, k = index % len(plan.groups), 0
    while True:
        if mix != "fixed":
            group = int(rng.integers(len(plan.groups)))
        block = (index + k * concurrency) % plan.pools[group]
        k += 1
        started = time.perf_counter()
        if started >= stop:
            return
        await asyncio.gather(*(timed(send, plan.ids[v][block], plan.rows, started, window)
                               for v in plan.groups[group]))


async def open_loop(send: Send, plan: Plan, window: Window, stop: float, rate: float,
                    seed: int) -> None:
    """Requests due at Poisson arrival times, each sent at once whatever is in flight."""
    rng = np.random.default_rng([seed, 1 << 20])
    tasks: set[asyncio.Task] = set()
    due, k = time.perf_counter(), 0
    while due < stop:
        await asyncio.sleep(max(due - time.perf_counter(), 0))
        group = int(rng.integers(len(plan.groups)))
        block = k % plan.pools[group]
        k += 1
        for v in plan.groups[group]:
            task = asyncio.create_task(timed(send, plan.ids[v][block], plan.rows, due, window))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        due += float(rng.exponential(1 / rate))
    await asyncio.gather(*tasks)


async def timed(send: Send, i: int, rows: list[int], started: float, window: Window) -> None:
    """Send request i, counting it if it started and ended inside the window."""
    code = await send(i)
    done = time.perf_counter()
    if window.start <= started and done <= window.end:
        if code is None:
            window.latencies.append(done - started)
            window.rows += rows[i]
        else:
            window.errors[code] = window.errors.get(code, 0) + 1
    elif code is not None and started < window.start:
        window.errors[f"warmup:{code}"] = window.errors.get(f"warmup:{code}", 0) + 1


def with_id(request: bytes, request_id: int) -> bytes:
    """A serialized ModelInferRequest with its `id` (field 3) set: a field appended to a
    message's bytes replaces the one before, so the request is not serialized again."""
    value = str(request_id).encode()
    return request + b"\x1a" + bytes([len(value)]) + value  # ids stay under 128 bytes


class Streams:
    """Requests in flight over `count` ModelStreamInfer streams of one channel, taken in
    turn; each answer resolves the future of the request whose id it carries."""

    def __init__(self, channel: grpc.aio.Channel, count: int) -> None:
        self._call = channel.stream_stream(
            STREAM, request_serializer=None,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        self._outboxes = [asyncio.Queue() for _ in range(count)]
        self._pending: dict[str, asyncio.Future] = {}
        self._next = 0
        self._readers = [asyncio.create_task(self._read(box)) for box in self._outboxes]

    async def _read(self, outbox: asyncio.Queue) -> None:
        async def requests() -> AsyncIterator[bytes]:
            while (request := await outbox.get()) is not None:
                yield request

        try:
            async for answer in self._call(requests()):
                future = self._pending.pop(answer.infer_response.id, None)
                if future is not None and not future.done():
                    future.set_result("stream_error" if answer.error_message else None)
        except grpc.aio.AioRpcError as exc:  # the stream ended: so did its requests
            code = exc.code().name
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_result(code)

    async def send(self, request: bytes, timeout: float) -> str | None:
        self._next += 1
        key = str(self._next)
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        self._outboxes[self._next % len(self._outboxes)].put_nowait(with_id(request, self._next))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._pending.pop(key, None)
            return "timeout"

    async def close(self) -> None:
        for box in self._outboxes:
            box.put_nowait(None)
        await asyncio.gather(*self._readers)


@contextlib.asynccontextmanager
async def door_sender(door: str, target: str, variants: list[dict], plan: Plan,
                      timeout: float, streams: int = 1) -> AsyncIterator[Send]:
    """How to send request i through `door`: a generic gRPC call, a message on a stream,
    or an HTTP POST."""
    requests = plan.payloads
    if "_grpc" in door:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            if door == "kserve_grpc_stream":
                carried = Streams(channel, streams)

                async def send_stream(i: int) -> str | None:
                    return await carried.send(requests[i], timeout)
                try:
                    yield send_stream
                finally:
                    await carried.close()
                return
            call = channel.unary_unary(METHOD if door == "kserve_grpc" else PREDICT,
                                       request_serializer=None, response_deserializer=None)

            async def send_grpc(i: int) -> str | None:
                try:
                    await call(requests[i], timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                return None
            yield send_grpc
        return
    import aiohttp  # the HTTP doors only

    urls, headers = [], []
    owners = [variants[v] for v, ids in enumerate(plan.ids) for _ in ids]  # variant-major
    for v, body in zip(owners, requests, strict=True):
        model, _, endpoint = v["model_name"].partition(".")
        if door == "kserve_http":
            urls.append(f"http://{target}/v2/models/{v['model_name']}/infer")
            headers.append({"Inference-Header-Content-Length":
                            str(int.from_bytes(body[:8], "little"))})
        else:
            urls.append(f"http://{target}/v1/models/{model}:predict")
            headers.append({"Content-Type": "application/json"})
    bodies = [b[8:] if door == "kserve_http" else b for b in requests]
    limit = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=limit) as session:

        async def send_http(i: int) -> str | None:
            try:
                async with session.post(urls[i], data=bodies[i], headers=headers[i]) as answer:
                    await answer.read()
                    return None if answer.status == 200 else f"HTTP {answer.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                return type(exc).__name__
        yield send_http


async def run(args: argparse.Namespace) -> dict:
    variants = json.loads(Path(args.spec).read_text())
    rng = np.random.default_rng(args.seed)
    plan = make_plan(args.door, variants, args.mix, rng)
    requests = plan.payloads
    async with door_sender(args.door, args.target, variants, plan, args.timeout,
                           args.streams) as send:
        # One of each first: a wrong request fails here, loudly, not as a slow run.
        failed = {v: code for v, ids in enumerate(plan.ids) if (code := await send(ids[0]))}
        if failed:
            raise SystemExit(f"the first request of each variant failed: {failed}")
        seen = [describe_response(await _raw_answer(args, requests[0]))] if (
            args.door.startswith("kserve_grpc")) else []
        now = time.perf_counter()
        window = Window(now + args.warmup, now + args.warmup + args.duration)
        stop = window.end
        if args.rate:
            workers = [asyncio.create_task(open_loop(send, plan, window, stop, args.rate,
                                                     args.seed))]
        else:
            workers = [asyncio.create_task(worker(i, send, plan, window, stop, args.mix,
                                                  args.seed, args.concurrency))
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
        "door": args.door,
        "concurrency": args.concurrency,
        "rate": args.rate or None,
        "streams": args.streams if args.door == "kserve_grpc_stream" else None,
        "mix": args.mix if len(variants) > 1 else None,
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


async def _raw_answer(args: argparse.Namespace, request: bytes) -> bytes:
    async with grpc.aio.insecure_channel(args.target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        return await call(request, timeout=args.timeout)


def snapshot(args: argparse.Namespace) -> dict:
    shot: dict = {"client_cpu": time.process_time(), "machine_cpu": machine_cpu()}
    if args.server_pid:
        shot["server_cpu"] = process_tree_cpu(args.server_pid)
    if args.metrics_url:
        shot["metrics"] = read_metrics(args.metrics_url, args.metric_prefix)
    return shot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the server's door")
    parser.add_argument("--door", choices=DOORS, default="kserve_grpc")
    parser.add_argument("--spec", required=True, help="JSON list of request variants")
    parser.add_argument("--concurrency", type=int, required=True,
                        help="requests in flight (one per worker)")
    parser.add_argument("--streams", type=int, default=1,
                        help="kserve_grpc_stream: streams the requests in flight share")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: requests per second, Poisson (0: closed loop)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=["random", "fixed", "fanout"], default="random",
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
