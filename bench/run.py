"""Tapserve's benchmarks: the real server under closed-loop gRPC load, next to the ceiling.

    .venv/bin/python bench/run.py [--scenarios 1,2,3,4] [--duration 10] [--peers]
    scripts/bench.sh [same flags]        # sets up what is missing first

1. `ae28`, a conv autoencoder on 28x28x1: 16-row requests, 16 in flight. Served rows/s
   against the same model called in-process (bench/inprocess.py) at the served mean
   batch size. Target: ratio >= 0.90.
2. `dense64`, a 64 -> 64 dense model: 1-row requests, 8 in flight, req/s and p99. With
   `--peers`, the same .keras file behind Seldon MLServer (adaptive batching,
   parallel_workers 0) and NVIDIA PyTriton (@batch, dynamic batcher), each from its own
   venv under bench/.venvs, with the same batching policy, client and request bytes.
   Target: >= 2x the best peer's req/s at a lower p99.
3. `trunk3`, one conv trunk and three heads as three endpoints with the same input:
   mixed traffic (each request to a random endpoint), 4-row requests, 12 in flight,
   shared passes on vs off. Target: req/s ratio >= 1.3.
4. `fanout3`, four conv layers shared by three light heads as three endpoints: each of
   4 clients sends one image (4 rows) to all three endpoints at once (12 requests in
   flight), as when several services ask about the same event. Identical rows computed
   once plus shared passes (`s4_dedup`) vs separate passes (`s4_separate`: shared passes
   and dedup_rows off), with the two halves between them (`s4_shared`,
   `s4_separate_dedup`). Target: req/s ratio >= 1.5.

`--backend jax` serves (and calls in-process) on Keras's JAX backend; `--backend
jax,tensorflow` runs scenarios 1 and 2 on both side by side: one server per backend, up
together, measured in alternating order round by round (`--rounds`), each served point
followed by its in-process ceiling on the same backend, and reports the median over rounds
of each ratio taken inside a round, so a machine whose speed drifts moves both sides.

Every scenario's requests carry distinct inputs (a pool of POOL blocks per variant, no
two requests in flight alike), except the images scenario 4 sends to several endpoints.

Each server runs as its own process, the load generator (bench/load.py) as another, and
this orchestrator only waits while they run. Every point is `--warmup` seconds of load,
then `--duration` seconds measured. Writes bench/out/results.json and a Markdown report
bench/out/report.md, and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

try:
    from tritonclient.grpc import service_pb2
except ImportError:  # no tritonclient (scripts/device-check.sh): the same messages,
    # generated in the project from the same proto
    from service.protocol.generated import grpc_predict_v2_pb2 as service_pb2

from service.settings import Settings, available_cpus, inter_op_threads, intra_op_threads

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
TAPSERVE = str(Path(PYTHON).with_name("tapserve"))
MLSERVER = BENCH / ".venvs" / "mlserver" / "bin" / "mlserver"
PYTRITON_PY = BENCH / ".venvs" / "pytriton" / "bin" / "python"

# Each scenario's max batch size, and the max queue delay of scenarios 1 and 3.
S1_BATCH, S2_BATCH, S3_BATCH, DELAY_MS = 64, 32, 64, 4.0
# Headline concurrency of each scenario, and the sweep around it.
HEADLINE = {1: 16, 2: 8, 3: 12, 4: 4}  # scenario 4: clients, each 3 requests in flight
SWEEP = {1: [4, 16, 32], 2: [1, 8, 32], 3: [12, 24], 4: [4, 8]}
# Input blocks per request variant: a multiple of every concurrency above, so requests in
# flight never carry the same data (bench/load.py); how each scenario's clients pick.
POOL = 96
MIX = {4: "fanout"}


@dataclass
class Policy:
    """The batching every server gets in one scenario."""

    max_batch_size: int
    max_queue_delay_ms: float


@dataclass
class Point:
    """One measured load point."""

    server: str
    concurrency: int
    load: dict
    mean_batch: float | None = None
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = self.load
        other = d["machine_cpu_cores"] - d["client_cpu_cores"] - d.get("server_cpu_cores", 0)
        return {"server": self.server, "concurrency": self.concurrency,
                "req_per_s": d["req_per_s"], "rows_per_s": d["rows_per_s"],
                "p50_ms": d["p50_ms"], "p90_ms": d["p90_ms"], "p99_ms": d["p99_ms"],
                "mean_batch": self.mean_batch, "errors": d["errors"],
                "server_cpu": d.get("server_cpu_cores"), "client_cpu": d["client_cpu_cores"],
                "other_cpu": max(other, 0.0), **self.extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class ServerProcess:
    """A server started in its own session (so its children stop with it), logging to a file."""

    def __init__(self, name: str, command: list[str], log_path: Path, grpc_port: int,
                 models: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        self.name, self.grpc_port, self.models = name, grpc_port, models
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        log(f"starting {name}: {' '.join(command)}")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd,
                                     start_new_session=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Until every model answers ModelReady true; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelReady",
                                       request_serializer=None, response_deserializer=None)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before "
                                       f"it was ready; last lines of {self.log_path}:\n"
                                       + tail(self.log_path))
                try:
                    ready = all(service_pb2.ModelReadyResponse.FromString(call(
                        service_pb2.ModelReadyRequest(name=m).SerializeToString(),
                        timeout=2)).ready for m in self.models)
                except grpc.RpcError:
                    ready = False
                if ready:
                    return
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def serve_command(repository: Path, grpc_port: int, metrics_port: int) -> list[str]:
    """`tapserve serve` on 127.0.0.1, logging only warnings; add flags to the end."""
    return [TAPSERVE, "serve", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port), "--http-port", "0", "--log-level", "WARNING"]


def tapserve(name: str, repository: Path, out: Path, args: argparse.Namespace,
             models: list[str], backend: str | None = None) -> tuple[ServerProcess, str]:
    grpc_port, metrics_port = free_port(), free_port()
    command = serve_command(repository, grpc_port, metrics_port) + [
        "--backend", backend or args.backends[0],
        "--cpu-batches-in-flight", str(args.cpu_batches_in_flight),
        "--intra-op-threads", str(args.threading["intra_op_threads"]),
        "--inter-op-threads", str(args.threading["inter_op_threads"])]
    server = ServerProcess(name, command, out / "logs" / f"{name}.log", grpc_port, models)
    return server, f"http://127.0.0.1:{metrics_port}/metrics"


def measure(server: ServerProcess, spec: list[dict], concurrency: int, out: Path,
            args: argparse.Namespace, tag: str, metrics_url: str | None = None,
            batch_metric: tuple[str, str] | None = None, door: str = "kserve_grpc",
            target: str | None = None, mix: str = "random", rate: float = 0.0) -> Point:
    """One load point from a separate load process (closed loop, or open loop at `rate`
    requests per second); mean batch from the metrics."""
    spec_path = out / "specs" / f"{tag}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    result_path = out / "points" / f"{tag}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    command = [PYTHON, str(BENCH / "load.py"), "--target", target or server.target,
               "--door", door, "--mix", mix,
               "--spec", str(spec_path), "--concurrency", str(concurrency),
               "--warmup", str(args.warmup), "--duration", str(args.duration),
               "--server-pid", str(server.proc.pid), "--out", str(result_path)]
    if rate:
        command += ["--rate", str(rate)]
    if metrics_url and batch_metric:
        command += ["--metrics-url", metrics_url, "--metric-prefix", batch_metric[0],
                    "--metric-prefix", batch_metric[1]]
        if batch_metric == TAPSERVE_BATCH:
            command += ["--metric-prefix", "tapserve_compute_duration_seconds",
                        "--metric-prefix", "tapserve_queue_duration_seconds",
                        "--metric-prefix", "tapserve_deduplicated_rows_total"]
    subprocess.run(command, check=True)
    load = json.loads(result_path.read_text())
    point = Point(server.name, concurrency, load)
    if batch_metric and "metrics_after" in load:
        before, after = load["metrics_before"], load["metrics_after"]
        point.mean_batch = mean_batch(before, after, *batch_metric)
        if batch_metric == TAPSERVE_BATCH:
            # Seconds per batch computing and per request queued; compute_busy is the
            # average number of batches computing at once (at most --cpu-batches-in-flight).
            compute = counter_delta(before, after, "tapserve_compute_duration_seconds_sum")
            batches = counter_delta(before, after, "tapserve_compute_duration_seconds_count")
            queued = counter_delta(before, after, "tapserve_queue_duration_seconds_sum")
            requests = counter_delta(before, after, "tapserve_queue_duration_seconds_count")
            rows = counter_delta(before, after, TAPSERVE_BATCH[0])
            saved = counter_delta(before, after, "tapserve_deduplicated_rows_total")
            point.extra = {
                "computed_rows": (rows - saved) / rows if rows else None,
                "compute_ms": 1000 * compute / batches if batches else None,
                "compute_busy": compute / args.duration,
                "queue_ms": 1000 * queued / requests if requests else None}
    r = point.row()
    load_shape = f"rate={rate:g}/s" if rate else f"c={concurrency}"
    log(f"{server.name} {load_shape}: {r['req_per_s']:.0f} req/s, {r['rows_per_s']:.0f} "
        f"rows/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, mean batch "
        f"{fmt(r['mean_batch'], 1)}, cpu server {fmt(r['server_cpu'], 2)} client "
        f"{r['client_cpu']:.2f} other {r['other_cpu']:.2f}"
        + (f", compute {fmt(r['compute_ms'], 2)} ms/batch, busy {r['compute_busy']:.2f}, "
           f"queued {fmt(r['queue_ms'], 2)} ms" if "compute_busy" in r else "")
        + (f", errors {r['errors']}" if r["errors"] else ""))
    return point


def counter_delta(before: dict, after: dict, name: str) -> float:
    """How much a counter (summed over its labels) grew over the window."""
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.split("{")[0] == name)


def mean_batch(before: dict, after: dict, rows_metric: str, batches_metric: str) -> float | None:
    """Rows per executed batch over the window, from two counters' deltas."""
    batches = counter_delta(before, after, batches_metric)
    return counter_delta(before, after, rows_metric) / batches if batches else None


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def variant(model_name: str, input_name: str, shape: list[int], **data: object) -> dict:
    return {"model_name": model_name,
            "inputs": [{"name": input_name, "datatype": "FP32", "shape": shape}],
            "pool": POOL, **data}


def request_mix(scenario: int) -> list[dict]:
    """The request variants of one scenario (mixed traffic draws among them)."""
    if scenario == 1:
        return [variant("ae28", "image", [16, 28, 28, 1])]
    if scenario == 2:
        return [variant("dense64", "x", [1, 64])]
    if scenario == 3:
        return [variant(f"trunk3.{e}", "image", [4, 28, 28, 1])
                for e in ("classify", "embed", "decode")]
    return [variant(f"fanout3.{e}", "image", [4, 28, 28, 1], data="images")
            for e in ("classify", "embed", "attributes")]


def build_models(out: Path, s1_batch: int = S1_BATCH, s2_batch: int = S2_BATCH,
                 s3_batch: int = S3_BATCH, delay_ms: float = DELAY_MS) -> dict:
    """The bench's models and repositories under `out` (bench/models.py), and their info."""
    built = subprocess.run(
        [PYTHON, str(BENCH / "models.py"), "--out", str(out),
         "--s1-batch", str(s1_batch), "--s2-batch", str(s2_batch),
         "--s3-batch", str(s3_batch), "--delay-ms", str(delay_ms)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(built.stdout.strip().splitlines()[-1])


def concurrencies(scenario: int, args: argparse.Namespace) -> list[int]:
    return SWEEP[scenario] if args.sweep else [HEADLINE[scenario]]


TAPSERVE_BATCH = ("tapserve_batch_size_sum", "tapserve_batch_size_count")


def scenario1(models: dict, out: Path, args: argparse.Namespace) -> dict:
    spec = request_mix(1)
    server, metrics_url = tapserve("tapserve-s1", out / "models" / "s1", out, args, ["ae28"])
    points = []
    with running(server):
        for c in concurrencies(1, args):
            points.append(measure(server, spec, c, out, args, f"s1_tapserve_c{c}",
                                  metrics_url, TAPSERVE_BATCH))
    head = next(p for p in points if p.concurrency == HEADLINE[1])
    batch = round(head.mean_batch or args.s1_batch)
    inproc = in_process(models["paths"]["ae28"], batch, args.backends[0], out, args,
                        "s1_inprocess")
    served = head.row()
    ratio = served["rows_per_s"] / inproc["rows_per_s"]
    # Rows per CPU-second, server process (all threads) vs in-process: what the serving
    # path costs beyond the model, whatever else the machine was doing.
    per_core = ((served["rows_per_s"] / served["server_cpu"])
                / (inproc["rows_per_s"] / inproc["cpu_cores"]))
    log(f"in-process: {inproc['rows_per_s']:.0f} rows/s ({inproc['cpu_cores']:.2f} cores); "
        f"served/in-process = {ratio:.3f}; per CPU-second {per_core:.3f}")
    return {"points": [p.row() for p in points], "inprocess": inproc,
            "headline_concurrency": HEADLINE[1], "ratio": ratio,
            "ratio_per_cpu_second": per_core, "target": 0.90, "met": ratio >= 0.90}


def in_process(model_path: str, batch: int, backend: str, out: Path,
               args: argparse.Namespace, tag: str) -> dict:
    """The in-process ceiling (bench/inprocess.py) of one model at one batch size."""
    result_path = out / "points" / f"{tag}.json"
    command = [PYTHON, str(BENCH / "inprocess.py"), "--backend", backend,
               "--model", model_path, "--batch", str(batch),
               "--threads", str(args.cpu_batches_in_flight),
               "--intra-op-threads", str(args.ceiling_intra_op_threads),
               "--inter-op-threads", str(args.ceiling_inter_op_threads),
               "--warmup", str(args.warmup), "--duration", str(args.duration),
               "--out", str(result_path)]
    log(f"in-process ceiling on {backend}: {Path(model_path).parts[-3]} at batch {batch}, "
        f"{args.cpu_batches_in_flight} threads")
    subprocess.run(command, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return json.loads(result_path.read_text())


def side_by_side(scenario: int, models: dict, out: Path, args: argparse.Namespace) -> dict:
    """Scenario 1 or 2 on each backend of --backend, in alternating order round by round;
    the first backend over the second, per round, then the median."""
    model = {1: "ae28", 2: "dense64"}[scenario]
    repo = (out / "models" / "s1" if scenario == 1
            else s2_repository(out, Policy(args.s2_batch, args.s2_delays[0])))
    spec, concurrency = request_mix(scenario), HEADLINE[scenario]
    servers = {b: tapserve(f"tapserve-{b}-s{scenario}", repo, out, args, [model], b)
               for b in args.backends}
    rounds: list[dict] = []
    with contextlib.ExitStack() as stack:
        for server, _ in servers.values():
            stack.enter_context(running(server))
        for r in range(args.rounds):
            measured = {}
            for b in args.backends if r % 2 == 0 else args.backends[::-1]:
                server, metrics_url = servers[b]
                point = measure(server, spec, concurrency, out, args, f"s{scenario}_{b}_r{r}",
                                metrics_url, TAPSERVE_BATCH)
                batch = max(1, round(point.mean_batch or 1))
                inproc = in_process(models["paths"][model], batch, b, out, args,
                                    f"s{scenario}_{b}_r{r}_inprocess")
                measured[b] = {**point.row(), "inprocess_batch": batch,
                               "inprocess_rows_per_s": inproc["rows_per_s"],
                               "inprocess_cores": inproc["cpu_cores"],
                               "served_over_inprocess": point.row()["rows_per_s"]
                               / inproc["rows_per_s"]}
            rounds.append(measured)
    result = {"model": model, "backends": args.backends, "concurrency": concurrency,
              "rounds": rounds, **backend_ratios(rounds, args.backends)}
    first, second = args.backends[:2]
    log(f"scenario {scenario}: {first}/{second} served rows/s {result['served_ratio']:.2f}, "
        f"p99 {result['p99_ratio']:.2f}, in-process {result['inprocess_ratio']:.2f} "
        f"(medians of {args.rounds} rounds)")
    return result


def backend_ratios(rounds: list[dict], backends: list[str]) -> dict:
    """The first backend's figures over the second's, each the median over rounds of the
    ratio inside a round; per CPU-second too (the server's process tree, the in-process
    run's), which holds better than rows/s when other work takes the cores."""
    first, second = backends[:2]

    def median(value: Callable[[dict], float]) -> float:
        return statistics.median(value(m[first]) / value(m[second]) for m in rounds)

    return {"served_ratio": median(lambda m: m["rows_per_s"]),
            "p99_ratio": median(lambda m: m["p99_ms"]),
            "inprocess_ratio": median(lambda m: m["inprocess_rows_per_s"]),
            "served_per_cpu_ratio": median(lambda m: m["rows_per_s"] / m["server_cpu"]),
            "inprocess_per_cpu_ratio": median(
                lambda m: m["inprocess_rows_per_s"] / m["inprocess_cores"]),
            "served_over_inprocess": {b: statistics.median(
                m[b]["served_over_inprocess"] for m in rounds) for b in backends}}


def mlserver(out: Path, model_path: str, policy: Policy,
             threading: dict) -> tuple[ServerProcess, str]:
    """MLServer on free ports, serving the model with bench/peers/mlserver_model.py."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    repo = out / "peers" / "mlserver"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / "dense64").mkdir(parents=True)
    (repo / "settings.json").write_text(json.dumps({
        "parallel_workers": 0, "host": "127.0.0.1", "http_port": http_port,
        "grpc_port": grpc_port, "metrics_port": metrics_port}, indent=2))
    settings = json.loads((BENCH / "peers" / "model-settings.json").read_text())
    settings["parameters"]["uri"] = model_path
    settings["parameters"]["extra"] = {"intra_op": threading["intra_op_threads"],
                                       "inter_op": threading["inter_op_threads"]}
    settings["max_batch_size"] = policy.max_batch_size
    settings["max_batch_time"] = policy.max_queue_delay_ms / 1000
    (repo / "dense64" / "model-settings.json").write_text(json.dumps(settings, indent=2))
    server = ServerProcess("mlserver", [str(MLSERVER), "start", str(repo)],
                           out / "logs" / "mlserver.log", grpc_port, ["dense64"],
                           env={"PYTHONPATH": str(BENCH / "peers")}, cwd=repo)
    return server, f"http://127.0.0.1:{metrics_port}/metrics"


def pytriton(out: Path, model_path: str, policy: Policy,
             threading: dict) -> tuple[ServerProcess, str]:
    """PyTriton on free ports; its Triton server needs the venv's libpython on the path."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    libdir = subprocess.run(
        [str(PYTRITON_PY), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        check=True, capture_output=True, text=True).stdout.strip()
    env = {"LD_LIBRARY_PATH": ":".join(filter(None, [libdir,
                                                     os.environ.get("LD_LIBRARY_PATH")]))}
    command = [str(PYTRITON_PY), str(BENCH / "peers" / "pytriton_server.py"),
               "--model", model_path, "--name", "dense64",
               "--grpc-port", str(grpc_port), "--http-port", str(http_port),
               "--metrics-port", str(metrics_port),
               "--max-batch-size", str(policy.max_batch_size),
               "--max-queue-delay-us", str(round(policy.max_queue_delay_ms * 1000)),
               "--intra-op-threads", str(threading["intra_op_threads"]),
               "--inter-op-threads", str(threading["inter_op_threads"])]
    server = ServerProcess("pytriton", command, out / "logs" / "pytriton.log", grpc_port,
                           ["dense64"], env=env)
    return server, f"http://127.0.0.1:{metrics_port}/metrics"


def s2_repository(out: Path, policy: Policy) -> Path:
    """bench/out/models/s2 with this policy in its config.yaml."""
    repo = out / "models" / f"s2_delay{policy.max_queue_delay_ms:g}"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(out / "models" / "s2", repo)
    config = repo / "dense64" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["batching"] = {"max_batch_size": policy.max_batch_size,
                        "max_queue_delay_ms": policy.max_queue_delay_ms}
    config.write_text(yaml.safe_dump(data))
    return repo


def scenario2(models: dict, out: Path, args: argparse.Namespace) -> dict:
    """Every server under every batching policy (max delay), same max batch size."""
    spec = request_mix(2)
    path = models["paths"]["dense64"]
    points, failures = [], {}
    for delay in args.s2_delays:
        policy = Policy(args.s2_batch, delay)
        servers = [("tapserve", lambda p=policy: tapserve(
            "tapserve", s2_repository(out, p), out, args, ["dense64"]), TAPSERVE_BATCH)]
        if args.peers:
            servers += [("mlserver", lambda p=policy: mlserver(out, path, p, args.threading),
                         ("bench_batch_rows_sum", "bench_batch_rows_count")),
                        ("pytriton", lambda p=policy: pytriton(out, path, p, args.threading),
                         ("nv_inference_count", "nv_inference_exec_count"))]
        for name, start, batch_metric in servers:
            try:
                server, metrics_url = start()
                with running(server):
                    for c in concurrencies(2, args):
                        point = measure(server, spec, c, out, args,
                                        f"s2_{name}_delay{delay:g}_c{c}", metrics_url,
                                        batch_metric)
                        point.extra["delay_ms"] = delay
                        points.append(point)
            except Exception as exc:  # a peer that cannot run is reported, not faked
                if name == "tapserve":
                    raise
                log(f"{name} failed: {exc}")
                failures[f"{name} (delay {delay:g} ms)"] = str(exc)
    rows = [p.row() for p in points]
    result = {"points": rows, "failures": failures, "max_batch_size": args.s2_batch,
              "delays_ms": args.s2_delays, "headline_concurrency": HEADLINE[2],
              "comparisons": []}
    head = [r for r in rows if r["concurrency"] == HEADLINE[2]]

    def compare(label: str, ours: list[dict], theirs: list[dict]) -> None:
        if not ours or not theirs:
            return
        mine = max(ours, key=lambda r: r["req_per_s"])
        best = max(theirs, key=lambda r: r["req_per_s"])
        c = {"label": label, "tapserve_delay_ms": mine["delay_ms"],
             "best_peer": best["server"], "peer_delay_ms": best["delay_ms"],
             "ratio": mine["req_per_s"] / best["req_per_s"],
             "p99_tapserve_ms": mine["p99_ms"], "p99_best_peer_ms": best["p99_ms"],
             "met": mine["req_per_s"] >= 2 * best["req_per_s"]
             and mine["p99_ms"] < best["p99_ms"]}
        result["comparisons"].append(c)
        log(f"{label}: tapserve/{best['server']} req/s = {c['ratio']:.2f}, p99 "
            f"{c['p99_tapserve_ms']:.2f} vs {c['p99_best_peer_ms']:.2f} ms")

    for delay in args.s2_delays:
        same = [r for r in head if r["delay_ms"] == delay]
        compare(f"max delay {delay:g} ms for all", [r for r in same if r["server"] == "tapserve"],
                [r for r in same if r["server"] != "tapserve"])
    if len(args.s2_delays) > 1:
        compare("each at its best delay", [r for r in head if r["server"] == "tapserve"],
                [r for r in head if r["server"] != "tapserve"])
    result["met"] = any(c["met"] for c in result["comparisons"]) if result["comparisons"] \
        else None
    return result


def compare_repositories(scenario: int, model: str, repos: list[str], target: float,
                         out: Path, args: argparse.Namespace) -> dict:
    """Each repository served in turn under the scenario's load; the first over the last."""
    spec, points = request_mix(scenario), []
    for repo in repos:
        server, metrics_url = tapserve(f"tapserve-{repo}", out / "models" / repo, out, args,
                                       [model])
        with running(server):
            for c in concurrencies(scenario, args):
                points.append(measure(server, spec, c, out, args, f"s{scenario}_{repo}_c{c}",
                                      metrics_url, TAPSERVE_BATCH,
                                      mix=MIX.get(scenario, "random")))
    head = {p.server: p.row() for p in points if p.concurrency == HEADLINE[scenario]}
    on, off = head[f"tapserve-{repos[0]}"], head[f"tapserve-{repos[-1]}"]
    ratio = on["req_per_s"] / off["req_per_s"]
    log(f"{repos[0]}/{repos[-1]} req/s = {ratio:.2f}, p99 {on['p99_ms']:.2f} vs "
        f"{off['p99_ms']:.2f} ms")
    return {"points": [p.row() for p in points], "headline_concurrency": HEADLINE[scenario],
            "on": repos[0], "off": repos[-1], "ratio": ratio, "p99_on_ms": on["p99_ms"],
            "p99_off_ms": off["p99_ms"], "target": target, "met": ratio >= target}


def scenario3(models: dict, out: Path, args: argparse.Namespace) -> dict:
    return compare_repositories(3, "trunk3", ["s3_shared", "s3_separate"], 1.3, out, args)


def scenario4(models: dict, out: Path, args: argparse.Namespace) -> dict:
    return compare_repositories(4, "fanout3", ["s4_dedup", "s4_shared", "s4_separate_dedup",
                                               "s4_separate"], 1.5, out, args)


def machine() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    model = next((line.split(":", 1)[1].strip() for line in run("lscpu").splitlines()
                  if line.startswith("Model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    versions = run(PYTHON, "-c", "import importlib.metadata as m\nfor p in ('tensorflow', "
                   "'jax', 'keras', 'grpcio', 'tapserve'):\n try: print(p, m.version(p), end=', ')"
                   "\n except m.PackageNotFoundError: pass").strip(", ")
    commit = run("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = run("git", "-C", str(ROOT), "status", "--porcelain", "--", "service")
    return {"nproc": os.cpu_count(), "cpu": model, "memory_gib": round(mem_kb / 2**20, 1),
            "tapserve_commit": commit + (" (service/ modified)" if dirty else ""),
            "python": platform.python_version(), "packages": versions,
            "kernel": platform.release(), "loadavg_at_start": os.getloadavg()}


def report(results: dict) -> str:
    """The run as Markdown tables."""
    m = results["machine"]
    lines = [f"Run {results['date']} ({results['seconds']:.0f} s): `{results['command']}`", "",
             f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
             f"Python {m['python']}, {m['packages']}, kernel {m['kernel']}; Tapserve at "
             f"{m['tapserve_commit']}; load average "
             f"at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.", "",
             "TensorFlow threading of Tapserve and of the peers (Tapserve's defaults on "
             f"this machine unless the command sets them): intra-op "
             f"{results['threading']['intra_op_threads']}, inter-op "
             f"{results['threading']['inter_op_threads']}; Tapserve computes "
             f"{results['threading']['batches_in_flight']} batches at once.", "",
             "Columns: latencies are per request at the client; mean batch is rows per "
             "executed batch (server metrics), rows asked for; computed rows the share of "
             "them computed (the rest were byte-identical copies, computed once); cores "
             "are CPU-seconds per second over the "
             "window: the server's process tree, the load client, and everything else on "
             "the machine; compute is Tapserve's time per batch from dispatch to result, "
             "queued its time per request before its batch started.", ""]
    header = ("| server | delay ms | in flight | req/s | rows/s | p50 ms | p90 ms | p99 ms "
              "| mean batch | computed rows | compute ms | queued ms | server cores "
              "| client cores | other cores |")
    for key, title in (("s1", "1. Conv autoencoder 28x28x1, 16-row requests"),
                       ("s2", "2. Dense 64->64, 1-row requests"),
                       ("s3", "3. Three heads on one conv trunk, mixed traffic, "
                              "4-row requests"),
                       ("s4", "4. Three light heads on a heavy conv trunk, each image sent "
                              "to all three, 4-row requests")):
        if key not in results["scenarios"]:
            continue
        s = results["scenarios"][key]
        if "rounds" in s:
            lines += side_by_side_report(title, s)
            continue
        lines += [f"### {title}", "", header, "|" + " --- |" * 15]
        for r in s["points"]:
            lines.append(
                f"| {r['server']} | {fmt(r.get('delay_ms', results['delay_ms']), 0)} | "
                f"{r['concurrency']} | {r['req_per_s']:.0f} | {r['rows_per_s']:.0f} | "
                f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{fmt(r['mean_batch'], 1)} | {fmt(r.get('computed_rows'), 2)} | "
                f"{fmt(r.get('compute_ms'), 2)} | "
                f"{fmt(r.get('queue_ms'), 2)} | {fmt(r['server_cpu'], 2)} | "
                f"{r['client_cpu']:.2f} | {r['other_cpu']:.2f} |"
                + (f" errors {r['errors']}" if r["errors"] else ""))
        lines.append("")
        if key == "s1":
            ip = s["inprocess"]
            lines.append(
                f"In-process ceiling (same model, "
                f"{'`jax.jit`' if results.get('backends') == ['jax'] else '`tf.function`'}, "
                f"batch {ip['batch']} = the "
                f"served mean batch, {ip['threads']} threads, intra-op "
                f"{ip['intra_op_threads']}, inter-op {ip['inter_op_threads']}): "
                f"{ip['rows_per_s']:.0f} rows/s, p50 {ip['p50_ms']:.2f} ms per call, "
                f"{ip['cpu_cores']:.2f} cores.")
            lines.append("")
            lines.append(
                f"**Served / in-process rows/s at {s['headline_concurrency']} in flight: "
                f"{s['ratio']:.3f}** (target >= 0.90: {'met' if s['met'] else 'not met'}); "
                f"per CPU-second of the server process vs of the in-process run: "
                f"{s['ratio_per_cpu_second']:.3f}.")
        elif key == "s2":
            for name, error in s["failures"].items():
                lines.append(f"- {name} could not run: `{error.splitlines()[0]}`")
            for c in s["comparisons"]:
                lines.append(
                    f"- {c['label']}: **Tapserve (delay {c['tapserve_delay_ms']:g} ms) / "
                    f"{c['best_peer']} (delay {c['peer_delay_ms']:g} ms) req/s at "
                    f"{s['headline_concurrency']} in flight: {c['ratio']:.2f}**, p99 "
                    f"{c['p99_tapserve_ms']:.2f} ms vs {c['p99_best_peer_ms']:.2f} ms "
                    f"(target >= 2x at a lower p99: {'met' if c['met'] else 'not met'}).")
            lines.append(f"- Max batch size {s['max_batch_size']} for every server.")
        else:
            lines.append(
                f"**{s['on']} / {s['off']} req/s at {s['headline_concurrency']} clients: "
                f"{s['ratio']:.2f}**, p99 {s['p99_on_ms']:.2f} ms vs "
                f"{s['p99_off_ms']:.2f} ms (target >= {s['target']}: "
                f"{'met' if s['met'] else 'not met'}).")
        lines.append("")
    return "\n".join(lines)


def side_by_side_report(title: str, s: dict) -> list[str]:
    """One scenario on several backends: each round's points, then the median ratios."""
    lines = [f"### {title}, backends side by side ({s['concurrency']} in flight)", "",
             "| round | backend | rows/s | p50 ms | p99 ms | mean batch | server cores "
             "| in-process rows/s (batch) | in-process cores | served / in-process |",
             "|" + " --- |" * 10]
    for r, measured in enumerate(s["rounds"]):
        for b, m in measured.items():
            lines.append(
                f"| {r + 1} | {b} | {m['rows_per_s']:.0f} | {m['p50_ms']:.2f} | "
                f"{m['p99_ms']:.2f} | {fmt(m['mean_batch'], 1)} | {fmt(m['server_cpu'], 2)} | "
                f"{m['inprocess_rows_per_s']:.0f} ({m['inprocess_batch']}) | "
                f"{m['inprocess_cores']:.2f} | {m['served_over_inprocess']:.2f} |")
    first, second = s["backends"][:2]
    lines += ["", f"**{first} / {second}, medians of the rounds' ratios: served rows/s "
              f"{s['served_ratio']:.2f}, p99 {s['p99_ratio']:.2f}, in-process rows/s "
              f"{s['inprocess_ratio']:.2f}**; per CPU-second: served "
              f"{s['served_per_cpu_ratio']:.2f}, in-process {s['inprocess_per_cpu_ratio']:.2f}; "
              "served / in-process: "
              + ", ".join(f"{b} {v:.2f}" for b, v in s["served_over_inprocess"].items())
              + ".", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="1,2,3,4", help="comma-separated: 1,2,3,4")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds/point")
    parser.add_argument("--warmup", type=float, default=3.0, help="load seconds before each")
    parser.add_argument("--peers", action="store_true",
                        help="scenario 2 also on MLServer and PyTriton (bench/.venvs)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="only each scenario's headline concurrency")
    parser.add_argument("--s1-batch", type=int, default=S1_BATCH,
                        help="max_batch_size, scenario 1")
    parser.add_argument("--s2-batch", type=int, default=S2_BATCH,
                        help="max batch size, scenario 2")
    parser.add_argument("--s2-delays", default="4,2,0",
                        help="max queue delays (ms) scenario 2 runs every server with")
    parser.add_argument("--s3-batch", type=int, default=S3_BATCH,
                        help="max_batch_size, scenario 3")
    parser.add_argument("--delay-ms", type=float, default=DELAY_MS,
                        help="max queue delay, scenarios 1 and 3")
    parser.add_argument("--cpu-batches-in-flight", type=int, default=2)
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="TensorFlow threading of Tapserve and the peers (default: what "
                        "Tapserve picks on this machine)")
    parser.add_argument("--inter-op-threads", type=int, default=None)
    parser.add_argument("--ceiling-intra-op-threads", type=int, default=None,
                        help="the in-process ceiling's threading (default: the CPUs shared by "
                        "its threads; inter-op: every CPU, as it has no front end to leave "
                        "room for)")
    parser.add_argument("--ceiling-inter-op-threads", type=int, default=None)
    parser.add_argument("--backend", default="tensorflow",
                        help="tensorflow or jax; two, comma-separated (jax,tensorflow): "
                        "scenarios 1 and 2 on both, side by side, the first over the second")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds when backends run side by side")
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    args = parser.parse_args()
    scenarios = sorted({int(s) for s in args.scenarios.split(",")})
    args.backends = args.backend.split(",")
    if not set(args.backends) <= {"tensorflow", "jax"} or len(set(args.backends)) != len(
            args.backends):
        parser.error(f"--backend {args.backend}: tensorflow, jax, or both comma-separated")
    if len(args.backends) > 1 and not set(scenarios) <= {1, 2}:
        parser.error("backends side by side run scenarios 1 and 2 only (--scenarios 1,2)")
    settings = Settings(cpu_batches_in_flight=args.cpu_batches_in_flight,
                        intra_op_threads=args.intra_op_threads,
                        inter_op_threads=args.inter_op_threads)
    args.threading = {"intra_op_threads": intra_op_threads(settings),
                      "inter_op_threads": inter_op_threads(settings)}
    if args.ceiling_intra_op_threads is None:  # Tapserve's own default for these threads
        args.ceiling_intra_op_threads = intra_op_threads(
            Settings(cpu_batches_in_flight=args.cpu_batches_in_flight, intra_op_threads=None))
    if args.ceiling_inter_op_threads is None:
        args.ceiling_inter_op_threads = available_cpus()
    args.s2_delays = [float(d) for d in args.s2_delays.split(",")]
    if args.peers and not (MLSERVER.exists() and PYTRITON_PY.exists()):
        log("--peers: bench/.venvs/{mlserver,pytriton} are missing; scripts/bench.sh makes "
            "them (a peer that is missing is reported as failed)")

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "command": " ".join([Path(PYTHON).relative_to(ROOT).as_posix()
                                    if Path(PYTHON).is_relative_to(ROOT) else PYTHON,
                                    *sys.argv]),
               "machine": machine(), "delay_ms": args.delay_ms, "backends": args.backends,
               "threading": {**args.threading, "batches_in_flight": args.cpu_batches_in_flight},
               "scenarios": {}}
    log(f"building models into {out / 'models'}")
    models = build_models(out / "models", args.s1_batch, args.s2_batch, args.s3_batch,
                          args.delay_ms)
    results["models"] = models
    runners = {1: scenario1, 2: scenario2, 3: scenario3, 4: scenario4}
    if len(args.backends) > 1:
        runners = {s: (lambda m, o, a, s=s: side_by_side(s, m, o, a)) for s in (1, 2)}
    for s in scenarios:
        log(f"scenario {s}")
        results["scenarios"][f"s{s}"] = runners[s](models, out, args)
    results["seconds"] = round(time.monotonic() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (out / "report.md").write_text(text + "\n")
    print()
    print(text)
    log(f"done in {results['seconds']:.0f}s: {out / 'results.json'}, {out / 'report.md'}")


if __name__ == "__main__":
    main()
