"""Tapserve's front doors side by side: one server, the same models and requests through
KServe v2 gRPC, TF Serving gRPC (Predict), KServe v2 HTTP (binary tensor data) and TF
Serving REST (JSON), each as a ratio to KServe v2 gRPC in the same run.

    .venv/bin/python bench/doors.py [--duration 8] [--warmup 2] [--concurrency 8]

Scenarios: 1-row requests to the 64->64 dense model (what a door costs per request) and
16-row requests to the 28x28 conv autoencoder (what it costs per byte: 50 KB in, 50 KB
out). Writes bench/out/doors.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import run as bench

DOORS = ("kserve_grpc", "tfserving_grpc", "kserve_http", "tfserving_http")
CASES = {"1-row dense64": ("s2", bench.variant("dense64", "x", [1, 64])),
         "16-row ae28": ("s1", bench.variant("ae28", "image", [16, 28, 28, 1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=bench.BENCH / "out")
    args = parser.parse_args()
    bench.build_models(args.out / "models")
    rows = []
    for case, (repo, variant) in CASES.items():
        grpc_port, metrics_port, http_port = (bench.free_port() for _ in range(3))
        command = bench.serve_command(args.out / "models" / repo, grpc_port, metrics_port)
        server = bench.ServerProcess(f"tapserve-doors-{repo}",
                                     command + ["--http-port", str(http_port)],
                                     args.out / "logs" / f"doors-{repo}.log", grpc_port,
                                     [variant["model_name"]])
        with bench.running(server):
            for door in DOORS:
                target = server.target if door.endswith("grpc") else f"127.0.0.1:{http_port}"
                point = bench.measure(server, [variant], args.concurrency, args.out, args,
                                      f"doors_{repo}_{door}", door=door, target=target)
                rows.append({"case": case, "door": door, **point.row()})
    base = {r["case"]: r["req_per_s"] for r in rows if r["door"] == "kserve_grpc"}
    lines = ["| case | door | req/s | vs KServe gRPC | p50 ms | p99 ms | server CPU cores |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['door']} | {r['req_per_s']:.0f} | "
                     f"{r['req_per_s'] / base[r['case']]:.2f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {bench.fmt(r['server_cpu'], 2)} |")
    (args.out / "doors.json").write_text(json.dumps(rows, indent=2))
    print(f"concurrency {args.concurrency}, {args.duration:g} s per point\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
