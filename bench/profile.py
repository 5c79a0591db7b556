"""Where a request's time goes: py-spy on the server under load, as microseconds per request.

    .venv/bin/python bench/profile.py [--scenario 2] [--concurrency 32] [--seconds 10]
        [--tapserve "FLAGS"]

Starts Tapserve on a scenario's repository (bench/run.py), drives it with bench/load.py,
and samples it with py-spy (`record --gil`: only samples where a thread holds the GIL,
the resource the event loop and the compute threads share), 200 times a second. Each
sample is put in the first category its stack meets, from the innermost frame out, and
each category's seconds are divided by the requests served meanwhile. py-spy comes from
bench/.venvs/tools (INSTALL below). Writes bench/out/profile.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from run import (
    BENCH,
    DELAY_MS,
    PYTHON,
    S2_BATCH,
    Policy,
    ServerProcess,
    build_models,
    free_port,
    request_mix,
    running,
    s2_repository,
    serve_command,
)

PY_SPY = BENCH / ".venvs" / "tools" / "bin" / "py-spy"
INSTALL = ("python3 -m venv bench/.venvs/tools && "
           "bench/.venvs/tools/bin/pip install -r bench/requirements-tools.txt")
RATE = 200
# (category, frame names that put a sample in it), tried from the innermost frame out.
CATEGORIES = [
    ("decode request", ("decode_infer_request", "decoded")),
    ("encode response", ("encode_infer_response",)),
    ("checks against the endpoint", ("LoadedModel.prepare", "InferCall.resolve")),
    ("row de-dup", ("distinct", "Distinct.expand")),
    ("merge and split", ("merge", "split")),
    ("queue (submit, batch forming)", ("Batcher.submit", "Batcher._next_batch",
                                       "Batcher._loop")),
    ("hand-off to compute threads", ("Runtime.run", "BaseEventLoop.run_in_executor")),
    ("metrics and statistics", ("InferCall.finish", "InferCall._labels", "InferCall._log",
                                "VersionStatistics.succeeded", "VersionStatistics.batch")),
    ("batch bookkeeping", ("Batcher._compute", "Batcher._run_batch")),
    ("data plane and servicer", ("InferCall.infer", "LoadedModel.infer",
                                 "InferenceServicer._infer", "InferenceServicer.ModelInfer")),
    ("interceptors", ("ErrorStatusInterceptor", "_mapping_errors", "RequestReadTimeout",
                      "BearerTokenInterceptor")),
    ("TensorFlow call (Python side)", ("KerasRuntime._compute", "Runtime._on_device")),
    ("gRPC and asyncio (Cython callbacks, loop)", ("Handle._run", "BaseEventLoop._run_once")),
]


def category(frames: list[str], thread: str) -> str:
    for frame in reversed(frames):
        name = frame.split(" (")[0]
        for label, names in CATEGORIES:
            if any(name == n or name.startswith(n + ".") for n in names):
                return label
    return f"other ({thread})"


def summarize(raw: Path, requests: int) -> dict[str, float]:
    """Microseconds of GIL per request, by category."""
    seconds: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = "compute thread" if "compute" in frames[0] else (
            "main thread" if "MainThread" in frames[0] else "other threads")
        seconds[category(frames[1:], thread)] += int(count) / RATE
    return {k: 1e6 * v / requests for k, v in seconds.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=int, choices=(1, 2), default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="sampled seconds")
    parser.add_argument("--tapserve", default="", help="extra `tapserve serve` flags")
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    args = parser.parse_args()
    spy = PY_SPY if PY_SPY.exists() else shutil.which("py-spy")
    if spy is None:
        raise SystemExit(f"py-spy is missing: {INSTALL}")
    out = args.out.resolve()
    if not (out / "models" / "s2").exists():
        build_models(out / "models")
    repo = (s2_repository(out, Policy(S2_BATCH, DELAY_MS)) if args.scenario == 2
            else out / "models" / "s1")
    port = free_port()
    server = ServerProcess("tapserve", serve_command(repo, port, free_port())
                           + shlex.split(args.tapserve), out / "logs" / "profile.log", port,
                           ["dense64" if args.scenario == 2 else "ae28"])
    spec, result, raw = out / "profile_spec.json", out / "profile_load.json", out / "profile.txt"
    spec.write_text(json.dumps(request_mix(args.scenario)))
    warmup = 3.0
    with running(server):
        load = subprocess.Popen([PYTHON, str(BENCH / "load.py"), "--target", server.target,
                                 "--spec", str(spec), "--concurrency", str(args.concurrency),
                                 "--warmup", str(warmup), "--duration", str(args.seconds),
                                 "--out", str(result)])
        time.sleep(warmup)
        subprocess.run([str(spy), "record", "--pid", str(server.proc.pid), "--duration",
                        str(round(args.seconds)), "--rate", str(RATE), "--gil", "--threads",
                        "--nonblocking", "--format", "raw", "--output", str(raw)],
                       check=True, capture_output=True)
        load.wait()
    served = json.loads(result.read_text())
    requests = served["requests"]
    budget = summarize(raw, requests)
    report = {"scenario": args.scenario, "concurrency": args.concurrency,
              "req_per_s": served["req_per_s"], "requests": requests,
              "us_per_request": budget, "total_us": sum(budget.values())}
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    print(f"{served['req_per_s']:.0f} req/s; GIL-held microseconds per request:")
    print("| where | µs per request |\n| --- | --- |")
    for label, us in budget.items():
        print(f"| {label} | {us:.0f} |")
    print(f"| **total** | **{report['total_us']:.0f}** |")


if __name__ == "__main__":
    main()
