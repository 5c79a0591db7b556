"""Front-end cost: Tapserve's server CPU per 1-row request over the Python gRPC floor's.

    .venv/bin/python bench/frontend.py [--concurrency 32] [--rounds 6] [--tapserve "FLAGS"] \
        [--floor-loop uvloop]

Scenario 2's request (`dense64`, one row) against Tapserve with its defaults and against
bench/floor.py (a bare grpc.aio servicer that parses the request and echoes its bytes),
in alternating windows as bench/ab.py does. Per window: server CPU-seconds (process tree)
over requests served, in microseconds. The result is the median over rounds of
Tapserve's per-request CPU over the floor's in the same round. Tapserve's figure includes
its compute (TensorFlow on a 1-row batch), the floor has none. Writes
bench/out/frontend.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
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
    measure,
    request_mix,
    running,
    s2_repository,
    serve_command,
)


def cpu_us_per_request(load: dict) -> float:
    return 1e6 * load["server_cpu_cores"] / load["req_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds/window")
    parser.add_argument("--warmup", type=float, default=1.0, help="load seconds before each")
    parser.add_argument("--delay-ms", type=float, default=4.0, help="dense64's max delay")
    parser.add_argument("--tapserve", default="", help="extra `tapserve serve` flags")
    parser.add_argument("--floor-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the floor's event loop (Tapserve's default is uvloop)")
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    args = parser.parse_args()
    out = args.out.resolve()
    (out / "frontend").mkdir(parents=True, exist_ok=True)
    if not (out / "models" / "s2").exists():
        build_models(out / "models")
    repo = s2_repository(out, Policy(S2_BATCH, args.delay_ms))
    port, floor_port = free_port(), free_port()
    sides = {
        "tapserve": ServerProcess(
            "tapserve", serve_command(repo, port, free_port()) + shlex.split(args.tapserve),
            out / "frontend" / "tapserve.log", port, ["dense64"]),
        "floor": ServerProcess(
            "floor", [PYTHON, str(BENCH / "floor.py"), "--port", str(floor_port),
                      "--loop", args.floor_loop],
            out / "frontend" / "floor.log", floor_port, ["dense64"]),
    }
    windows: dict[str, list[dict]] = {name: [] for name in sides}
    with running(sides["tapserve"]), running(sides["floor"]):
        for r in range(args.rounds):
            order = ("tapserve", "floor") if r % 2 == 0 else ("floor", "tapserve")
            for name in order:
                load = measure(sides[name], request_mix(2), args.concurrency, out, args,
                               f"frontend_{name}{r}").load
                windows[name].append({"req_per_s": load["req_per_s"],
                                      "server_cores": load["server_cpu_cores"],
                                      "client_cores": load["client_cpu_cores"],
                                      "cpu_us_per_request": cpu_us_per_request(load)})
    ratios = [t["cpu_us_per_request"] / f["cpu_us_per_request"]
              for t, f in zip(windows["tapserve"], windows["floor"], strict=True)]
    report = {"concurrency": args.concurrency, "tapserve_flags": args.tapserve,
              "floor_loop": args.floor_loop,
              "windows": windows, "ratio_per_round": ratios,
              "ratio": statistics.median(ratios), "command": " ".join(sys.argv)}
    (out / "frontend.json").write_text(json.dumps(report, indent=2))
    for name, ws in windows.items():
        print(f"{name}: median {statistics.median(w['req_per_s'] for w in ws):.0f} req/s, "
              f"{statistics.median(w['cpu_us_per_request'] for w in ws):.0f} us of server "
              f"CPU per request")
    print(f"Tapserve / floor server CPU per request, median of rounds: {report['ratio']:.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
