"""Tapserve's front doors side by side: one server, the same models and requests through
KServe v2 gRPC, KServe v2 gRPC streaming (ModelStreamInfer, one stream carrying every
request in flight), TF Serving gRPC (Predict), KServe v2 HTTP (binary tensor data) and TF
Serving REST (JSON), each as a ratio to KServe v2 gRPC in the same run.

    .venv/bin/python bench/doors.py [--duration 8] [--warmup 2] [--concurrency 8 [32 ...]]
        [--cases dense64] [--doors kserve_grpc kserve_grpc_stream]

Scenarios: 1-row requests to the 64->64 dense model (what a door costs per request) and
16-row requests to the 28x28 conv autoencoder (what it costs per byte: 50 KB in, 50 KB
out). Writes bench/out/doors.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import run as bench

DOORS = ("kserve_grpc", "kserve_grpc_stream", "tfserving_grpc", "kserve_http",
         "tfserving_http")
CASES = {"1-row dense64": ("s2", bench.variant("dense64", "x", [1, 64])),
         "16-row ae28": ("s1", bench.variant("ae28", "image", [16, 28, 28, 1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8],
                        help="requests in flight; several values: one point each")
    parser.add_argument("--cases", nargs="+", default=list(CASES), metavar="CASE",
                        help="cases to run, by a word of their name (e.g. dense64)")
    parser.add_argument("--doors", nargs="+", choices=DOORS, default=list(DOORS))
    parser.add_argument("--out", type=Path, default=bench.BENCH / "out")
    args = parser.parse_args()
    cases = {c: v for c, v in CASES.items() if any(w in c.split() for w in args.cases)}
    if not cases:
        parser.error(f"--cases names none of {list(CASES)}")
    bench.build_models(args.out / "models")
    rows = []
    for case, (repo, variant) in cases.items():
        grpc_port, metrics_port, http_port = (bench.free_port() for _ in range(3))
        command = bench.serve_command(args.out / "models" / repo, grpc_port, metrics_port)
        server = bench.ServerProcess(f"tapserve-doors-{repo}",
                                     command + ["--http-port", str(http_port)],
                                     args.out / "logs" / f"doors-{repo}.log", grpc_port,
                                     [variant["model_name"]])
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with bench.running(server):
            for concurrency in args.concurrency:
                for door in args.doors:
                    target = (server.target if "_grpc" in door
                              else f"127.0.0.1:{http_port}")
                    point = bench.measure(server, [variant], concurrency, args.out, args,
                                          f"doors_{repo}_{door}_c{concurrency}", door=door,
                                          target=target, metrics_url=metrics_url,
                                          batch_metric=bench.TAPSERVE_BATCH)
                    rows.append({"case": case, "door": door, **point.row()})
    base = {(r["case"], r["concurrency"]): r["req_per_s"] for r in rows
            if r["door"] == "kserve_grpc"}
    lines = ["| case | in flight | door | req/s | vs KServe gRPC | p50 ms | p99 ms | "
             "mean batch | server CPU cores |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        unary = base.get((r["case"], r["concurrency"]))
        lines.append(f"| {r['case']} | {r['concurrency']} | {r['door']} | "
                     f"{r['req_per_s']:.0f} | {bench.fmt(unary and r['req_per_s'] / unary, 2)} "
                     f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{bench.fmt(r['mean_batch'], 1)} | {bench.fmt(r['server_cpu'], 2)} |")
    (args.out / "doors.json").write_text(json.dumps(rows, indent=2))
    print(f"{args.duration:g} s per point\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
