"""Where a request's time goes, stage by stage, from the server's own histograms.

    .venv/bin/python bench/stages.py [--concurrency 8 32] [--duration 10] [--tapserve "FLAGS"]

Scenario 2's request (`dense64`, one row) against one Tapserve server, a closed loop at
each concurrency (bench/load.py). For each stage of `tapserve_request_stage_seconds`
(service.metrics.STAGES: decode, check, queue, handoff, compute, return, resume, encode)
it reports the mean, p50 and p99 of what the stage's histogram gained over the window
(linear inside a bucket, as Prometheus' histogram_quantile), beside the client's p50 and
p99 of whole requests. "outside" is the client's mean less the stages' means: gRPC and the
event loop before the handler starts and after the response is encoded, and the network.
A stage's p99 far above its p50 is where the tail comes from. Writes bench/out/stages.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from run import (
    BENCH,
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

sys.path.insert(0, str(BENCH.parent))
from service.metrics import STAGES  # noqa: E402

STAGE_METRIC = "tapserve_request_stage_seconds"
BUCKET = re.compile(STAGE_METRIC + r'_bucket\{(?P<labels>[^}]*)\}')


def buckets(samples: dict[str, float], stage: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of one stage's histogram, summed over models."""
    totals: dict[float, float] = {}
    for key, value in samples.items():
        match = BUCKET.match(key)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if labels.get("stage") == stage:
            le = float(labels["le"])
            totals[le] = totals.get(le, 0.0) + value
    return sorted(totals.items())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """histogram_quantile: linear inside the bucket the q-th observation falls in."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank, lower, below = q * cumulative[-1][1], 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def window(before: dict[str, float], after: dict[str, float]) -> dict[str, dict]:
    """Each stage's mean, p50 and p99 (ms) over what it gained between two scrapes."""
    stages = {}
    for stage in STAGES:
        start = dict(buckets(before, stage))
        gained = [(le, n - start.get(le, 0.0)) for le, n in buckets(after, stage)]
        total = sum(v - before.get(k, 0.0) for k, v in after.items()
                    if k.startswith(f"{STAGE_METRIC}_sum") and f'stage="{stage}"' in k)
        count = gained[-1][1] if gained else 0.0
        p50, p99 = quantile(0.5, gained), quantile(0.99, gained)
        stages[stage] = {"mean_ms": 1000 * total / count if count else None,
                         "p50_ms": None if p50 is None else 1000 * p50,
                         "p99_ms": None if p99 is None else 1000 * p99, "count": count}
    return stages


def measure(server: ServerProcess, metrics_url: str, concurrency: int, out: Path,
            args: argparse.Namespace) -> dict:
    spec_path = out / "specs" / f"stages_{concurrency}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(request_mix(2)))
    result_path = out / "points" / f"stages_{concurrency}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PYTHON, str(BENCH / "load.py"), "--target", server.target,
                    "--spec", str(spec_path), "--concurrency", str(concurrency),
                    "--warmup", str(args.warmup), "--duration", str(args.duration),
                    "--server-pid", str(server.proc.pid), "--out", str(result_path),
                    "--metrics-url", metrics_url, "--metric-prefix", STAGE_METRIC],
                   check=True)
    load = json.loads(result_path.read_text())
    stages = window(load["metrics_before"], load["metrics_after"])
    inside = sum(s["mean_ms"] or 0.0 for s in stages.values())
    return {"concurrency": concurrency, "req_per_s": load["req_per_s"],
            "client": {k: load[k] for k in ("mean_ms", "p50_ms", "p99_ms") if k in load},
            "stages": stages, "outside_mean_ms": load.get("mean_ms", inside) - inside,
            "server_cpu_cores": load.get("server_cpu_cores")}


def table(point: dict) -> str:
    c = point["client"]
    lines = [f"{point['concurrency']} in flight: {point['req_per_s']:.0f} req/s, client "
             f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms "
             f"(p99/p50 {c['p99_ms'] / c['p50_ms']:.2f})",
             "", "| stage | mean ms | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
    for stage, s in point["stages"].items():
        cells = [f"{s[k]:.3f}" if s[k] is not None else "-"
                 for k in ("mean_ms", "p50_ms", "p99_ms")]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append(f"| outside (client mean less the stages') | {point['outside_mean_ms']:.3f} "
                 "| | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds/point")
    parser.add_argument("--warmup", type=float, default=3.0, help="load seconds before each")
    parser.add_argument("--delay-ms", type=float, default=4.0, help="dense64's max delay")
    parser.add_argument("--tapserve", default="", help="extra `tapserve serve` flags")
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    args = parser.parse_args()
    out = args.out.resolve()
    if not (out / "models" / "s2").exists():
        build_models(out / "models")
    repo = s2_repository(out, Policy(S2_BATCH, args.delay_ms))
    port, metrics_port = free_port(), free_port()
    command = serve_command(repo, port, metrics_port) + shlex.split(args.tapserve)
    server = ServerProcess("tapserve", command, out / "logs" / "stages.log", port, ["dense64"])
    with running(server):
        points = [measure(server, f"http://127.0.0.1:{metrics_port}/metrics", c, out, args)
                  for c in args.concurrency]
    (out / "stages.json").write_text(json.dumps({"command": " ".join(sys.argv),
                                                 "points": points}, indent=2))
    for point in points:
        print(table(point), end="\n\n")


if __name__ == "__main__":
    main()
