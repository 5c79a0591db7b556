"""The GPU check's steps, run by scripts/device-check.sh once the wheels are importable.

    python3 scripts/device_check.py [--cpu] [--out DIR] [--requirements FILE]

On a machine with an NVIDIA GPU and JAX with CUDA (no TensorFlow, no network), it builds
the bench models (bench/models.py), serves them with `tapserve serve --backend jax` and
prints:
1. the devices the server runs its batches on: its start-up log line, its
   `tapserve_gpu_memory_bytes` gauge, and nvidia-smi's list of GPU processes;
2. served vs in-process rows/s of bench scenarios 1 (`ae28`, 16-row requests, 16 in
   flight) and 2 (`dense64`, 1-row requests, 8 in flight), with bench/load.py and
   bench/inprocess.py --backend jax at the served mean batch;
3. GPU memory after the load and after 1,000 more batches: it must not grow;
4. that the answers equal a CPU server's (JAX_PLATFORMS=cpu) to float tolerance.
Without a GPU (or with --cpu) it says so and runs the same steps on the CPU: a dry run.
Every step has a time limit; a failure exits 1 with a line naming the step and why.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import FrameType, ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Output tolerance against the CPU: XLA runs float32 matmuls and convolutions on an
# Ampere-or-newer GPU in TF32 (10-bit mantissa) unless told otherwise.
TOLERANCE = 2e-2
# Memory that may come and go between two reads without counting as growth.
MEMORY_SLACK = 16 * 2**20


class CheckFailed(Exception):
    """A step's failure: the message says which step and why."""


def log(message: str) -> None:
    print(f"[device-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def step(name: str, seconds: int) -> Iterator[None]:
    """A named step that fails if it runs past `seconds`."""
    def expire(signum: int, frame: FrameType | None) -> None:
        raise CheckFailed(f"{name}: still running after its {seconds} s limit")

    log(f"{name} (limit {seconds} s)")
    started = time.monotonic()
    signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(f"{name}: {type(exc).__name__}: {exc}") from exc
    finally:
        signal.alarm(0)
    log(f"{name}: done in {time.monotonic() - started:.0f} s")


def import_path(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def check_requirements(path: Path | None) -> None:
    """The device's own packages against what the wheels ask (wheelhouse.py wrote it)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    for name in ("jax", "jaxlib", "keras", "grpcio", "protobuf", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            log(f"  {name} {metadata.version(name)}")
    if path is None:
        return
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            raise CheckFailed(f"this machine lacks {req.name}, which the wheels need") from None
        if version not in req.specifier:
            raise CheckFailed(f"this machine has {req.name} {version}; the wheels need {req}")


def jax_devices(env: dict[str, str]) -> list[list[str]]:
    """[platform, device kind] of each device JAX sees, asked in a separate process."""
    done = subprocess.run(
        [PYTHON, "-c", "import jax, json; print(json.dumps("
         "[[d.platform, d.device_kind] for d in jax.devices()]))"],
        capture_output=True, text=True, timeout=120, env=env)
    if done.returncode:
        raise CheckFailed(f"jax cannot start: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scrape(url: str, prefix: str) -> dict[str, float]:
    """Samples of one metric family from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def nvidia_smi_processes() -> str:
    """nvidia-smi's GPU processes (pid, MiB), or why there are none to show."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip().replace("\n", "; ") or done.stderr.strip() or "none"


class Check:
    """The steps, sharing the servers, the bench modules and what was measured."""

    def __init__(self, args: argparse.Namespace, on_gpu: bool, env: dict[str, str]) -> None:
        self.args, self.on_gpu, self.env = args, on_gpu, env
        self.out: Path = args.out
        self.bench = import_path(ROOT / "bench" / "run.py", "bench_run")
        self.load = import_path(ROOT / "bench" / "load.py", "bench_load")
        self.summary: dict = {"device": "GPU" if on_gpu else "CPU (dry run)"}
        self.repo = self.out / "repo"
        self.device_server = None
        self.metrics_url = ""

    def serve(self, name: str, env: dict[str, str]):  # -> bench_run.ServerProcess
        b = self.bench
        grpc_port, metrics_port = b.free_port(), b.free_port()
        command = [PYTHON, "-m", "service.cli", "serve", "--backend", "jax",
                   "--model-repository", str(self.repo), "--host", "127.0.0.1",
                   "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                   "--http-port", "0", "--log-level", "INFO"]
        server = b.ServerProcess(name, command, self.out / "logs" / f"{name}.log", grpc_port,
                                 ["ae28", "dense64"], env=env, cwd=ROOT)
        server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        return server

    def build_models(self) -> None:
        built = subprocess.run(
            [PYTHON, str(ROOT / "bench" / "models.py"), "--out", str(self.out / "models"),
             "--delay-ms", str(self.bench.DELAY_MS)],
            capture_output=True, text=True, timeout=240,
            env={**self.env, "JAX_PLATFORMS": "cpu"})  # random weights: no GPU needed
        if built.returncode:
            raise CheckFailed(f"bench/models.py failed:\n{built.stderr[-2000:]}")
        self.models = json.loads(built.stdout.strip().splitlines()[-1])
        for scenario, model in (("s1", "ae28"), ("s2", "dense64")):
            shutil.copytree(self.out / "models" / scenario / model, self.repo / model)

    def start_device_server(self) -> None:
        self.device_server = self.serve("device", self.env)
        self.device_server.wait_ready(timeout=200)
        text = self.device_server.log_path.read_text(errors="replace")
        for line in text.splitlines():  # the backend, its devices, the compiled ladders
            if any(w in line for w in ("backend:", "devices:", "compiled")):
                log(f"  server log: {line.strip()}")
        named = [line.strip() for line in text.splitlines() if "devices:" in line]
        if not named:
            raise CheckFailed("the server's log names no devices (no 'devices:' line)")
        self.summary["server_devices"] = named[-1]
        if self.on_gpu and ("/GPU:" not in named[-1] or "no GPU" in named[-1]):
            raise CheckFailed(f"JAX sees a GPU but the server runs on none: {named[-1]}")

    def memory(self) -> dict[str, float]:
        """The server's GPU memory gauge (bytes per device) and its RSS."""
        server = self.device_server
        gauge = scrape(server.metrics_url, "tapserve_gpu_memory_bytes")
        if self.on_gpu and not any(v > 0 for v in gauge.values()):
            raise CheckFailed(f"tapserve_gpu_memory_bytes shows no memory on a GPU: {gauge}")
        return {**gauge, "rss": float(rss_bytes(server.proc.pid))}

    def served_vs_inprocess(self, scenario: int, model: str, concurrency: int) -> None:
        b, a = self.bench, self.args
        point = b.measure(self.device_server, b.request_mix(scenario), concurrency, self.out,
                          a, f"s{scenario}_served", self.device_server.metrics_url,
                          b.TAPSERVE_BATCH)
        row = point.row()
        if row["errors"]:
            raise CheckFailed(f"scenario {scenario}: {row['errors']} requests failed")
        batch = max(1, round(point.mean_batch or 1))
        result = self.out / "points" / f"s{scenario}_inprocess.json"
        done = subprocess.run(
            [PYTHON, str(ROOT / "bench" / "inprocess.py"), "--backend", "jax",
             "--model", self.models["paths"][model], "--batch", str(batch),
             "--threads", "1" if self.on_gpu else "2", "--warmup", str(a.warmup),
             "--duration", str(a.duration), "--out", str(result)],
            capture_output=True, text=True, timeout=120, env=self.env)
        if done.returncode:
            raise CheckFailed(f"bench/inprocess.py failed:\n{done.stderr[-2000:]}")
        inproc = json.loads(result.read_text())
        ratio = row["rows_per_s"] / inproc["rows_per_s"]
        log(f"  scenario {scenario} ({model}): served {row['rows_per_s']:.0f} rows/s "
            f"(p99 {row['p99_ms']:.2f} ms, mean batch {point.mean_batch or 0:.1f}), in-process "
            f"{inproc['rows_per_s']:.0f} rows/s at batch {batch}: ratio {ratio:.2f}")
        self.summary[f"s{scenario}"] = {
            "served_rows_per_s": row["rows_per_s"], "p99_ms": row["p99_ms"],
            "mean_batch": point.mean_batch, "inprocess_rows_per_s": inproc["rows_per_s"],
            "inprocess_batch": batch, "ratio": ratio}

    def batches(self, count: int) -> None:
        """`count` requests one after another: each is a batch of its own."""
        import grpc

        variant = self.bench.request_mix(1)[0]
        rng = np.random.default_rng(7)
        requests = [self.load.build_request(variant, self.load.random_inputs(variant, rng))
                    for _ in range(8)]
        before = scrape(self.device_server.metrics_url, "tapserve_batch_size_count")
        with grpc.insecure_channel(self.device_server.target) as channel:
            call = channel.unary_unary(self.load.METHOD)
            for i in range(count):
                call(requests[i % len(requests)], timeout=30)
        after = scrape(self.device_server.metrics_url, "tapserve_batch_size_count")
        ran = self.bench.counter_delta(before, after, "tapserve_batch_size_count")
        if ran < count:
            raise CheckFailed(f"{count} requests ran as {ran:.0f} batches")

    def answers(self, server) -> dict[str, dict[str, np.ndarray]]:  # noqa: ANN001
        """Fixed requests' outputs from one server."""
        import grpc

        service_pb2 = self.bench.service_pb2
        rng = np.random.default_rng(11)
        cases = {f"{model}/{rows}": (model, name, [rows, *shape])
                 for model, name, shape in (("ae28", "image", [28, 28, 1]),
                                            ("dense64", "x", [64]))
                 for rows in (1, 3, 16)}
        outputs = {}
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(self.load.METHOD)
            for case, (model, name, shape) in cases.items():
                variant = {"model_name": model,
                           "inputs": [{"name": name, "datatype": "FP32", "shape": shape}]}
                data = {name: rng.random(shape).astype(np.float32)}
                raw = call(self.load.build_request(variant, data), timeout=30)
                response = service_pb2.ModelInferResponse.FromString(raw)
                outputs[case] = {
                    o.name: np.frombuffer(c, np.float32).reshape(o.shape)
                    for o, c in zip(response.outputs, response.raw_output_contents, strict=True)}
        return outputs

    def compare_with_cpu(self) -> None:
        device = self.answers(self.device_server)
        reference = self.serve("cpu", {**self.env, "JAX_PLATFORMS": "cpu"})
        try:
            reference.wait_ready(timeout=200)
            cpu = self.answers(reference)
        finally:
            reference.stop()
        worst = 0.0
        for case, outs in cpu.items():
            if outs.keys() != device[case].keys():
                raise CheckFailed(f"{case}: outputs {sorted(device[case])} vs {sorted(outs)}")
            for name, expected in outs.items():
                got = device[case][name]
                if got.shape != expected.shape:
                    raise CheckFailed(f"{case} {name}: shape {got.shape} vs {expected.shape}")
                diff = float(np.max(np.abs(got - expected)))
                worst = max(worst, diff)
                if diff > TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
                    raise CheckFailed(f"{case} {name}: max |device - cpu| = {diff:.3g}")
        log(f"  answers: {len(cpu)} requests, max |device - cpu| = {worst:.3g} "
            f"(tolerance {TOLERANCE:g} x max(1, |answer|))")
        self.summary["answers_max_abs_diff"] = worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tapserve-device-check"))
    parser.add_argument("--requirements", type=Path, default=None,
                        help="device-requirements.txt of the wheelhouse")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--batches", type=int, default=1000)
    args = parser.parse_args()
    # A `timeout` around this script sends SIGTERM: stop the servers on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("device-check: FAILED: terminated"))
    started = time.monotonic()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    # KERAS_BACKEND for every child; the GPU's memory is taken as needed, not up front.
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
    check: Check | None = None
    try:
        with step("preflight: packages", 60):
            log(f"  python {sys.version.split()[0]} at {PYTHON}")
            check_requirements(args.requirements)
        with step("devices JAX sees", 150):
            devices = jax_devices(env)
            log(f"  jax: {devices}; nvidia-smi: {nvidia_smi_processes()}")
            on_gpu = any(platform == "gpu" for platform, _ in devices)
            if not on_gpu:
                log("  NO GPU " + ("(--cpu)" if args.cpu else "found") + ": a dry run, the "
                    "same steps on the CPU")
        check = Check(args, on_gpu, env)
        check.summary["jax_devices"] = devices
        with step("build the bench models", 300):
            check.build_models()
        with step("serve them with --backend jax", 240):
            check.start_device_server()
        with step("scenario 1 served and in-process", 150):
            check.served_vs_inprocess(1, "ae28", 16)
        with step("scenario 2 served and in-process", 150):
            check.served_vs_inprocess(2, "dense64", 8)
        with step(f"memory after load, then {args.batches} batches", 240):
            loaded = check.memory()
            check.batches(args.batches)
            after = check.memory()
            for key in loaded:
                grew = after[key] - loaded[key]
                log(f"  {key}: {loaded[key] / 2**20:.1f} MiB after load, "
                    f"{after[key] / 2**20:.1f} MiB after {args.batches} batches "
                    f"({grew / 2**20:+.1f} MiB)")
                if key != "rss" and grew > max(MEMORY_SLACK, 0.05 * loaded[key]):
                    raise CheckFailed(f"GPU memory grew by {grew / 2**20:.1f} MiB over "
                                      f"{args.batches} batches")
            check.summary["memory"] = {"after_load": loaded, "after_batches": after}
            log(f"  nvidia-smi: {nvidia_smi_processes()}")
        with step("answers against a CPU server", 240):
            check.compare_with_cpu()
    except CheckFailed as failure:
        log(f"FAILED: {failure}")
        server = check.device_server if check is not None else None
        if server is not None and "last lines" not in str(failure):
            log(f"  last lines of {server.log_path}:\n" + check.bench.tail(server.log_path))
        sys.exit(f"device-check: FAILED: {str(failure).splitlines()[0]}")
    finally:
        if check is not None and check.device_server is not None:
            check.device_server.stop()
    check.summary["seconds"] = round(time.monotonic() - started)
    (args.out / "summary.json").write_text(json.dumps(check.summary, indent=2, default=str))
    log(f"OK in {check.summary['seconds']} s on {check.summary['device']}: "
        f"{args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
