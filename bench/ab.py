"""A/B: two Tapserve configurations side by side, in alternating short load windows.

    .venv/bin/python bench/ab.py --scenario 1 --b "--inter-op-threads 2"
    .venv/bin/python bench/ab.py --scenario 2 --a "--cpu-batches-in-flight 2" \
        --b "--cpu-batches-in-flight 1" --rounds 6
    .venv/bin/python bench/ab.py --scenario 4 --a-models s4_separate --b-models s4_dedup
    .venv/bin/python bench/ab.py --scenario 2 --door kserve_http \
        --a-env PYTHONPATH=/path/to/old/checkout --b-env PYTHONPATH=$PWD   # code A/B

Single windows on a shared machine swing by tens of percent; a change worth a few
percent is only visible when both sides see the same background. Both servers start
once and stay up (idle, they cost nothing); the load (bench/load.py, the headline
concurrency of the scenario, see bench/run.py) then alternates between them, A B, B A,
A B..., and the result is the median over rounds of B's req/s over A's in the same
round. `--a` and `--b` are extra `tapserve serve` flags (Tapserve's own defaults
otherwise); `--a-env`/`--b-env` set environment variables (KEY=VALUE,...); `--a-models`/`--b-models`
another repository under bench/out/models. Writes bench/out/ab.json (each window's
client result under bench/out/points/ab_*).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from load import DOORS
from run import (
    BENCH,
    HEADLINE,
    MIX,
    S2_BATCH,
    Policy,
    ServerProcess,
    build_models,
    free_port,
    log,
    measure,
    request_mix,
    running,
    s2_repository,
    serve_command,
)

MODEL = {1: "ae28", 2: "dense64", 3: "trunk3", 4: "fanout3"}
# The repository bench/run.py serves first in each scenario (2 is written per delay).
REPOSITORY = {1: "s1", 3: "s3_shared", 4: "s4_dedup"}


def repository(scenario: int, models: Path, delay_ms: float) -> Path:
    """The model repository bench/run.py serves in one scenario."""
    if scenario == 2:
        return s2_repository(models.parent, Policy(S2_BATCH, delay_ms))
    return models / REPOSITORY[scenario]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=int, choices=(1, 2, 3, 4), required=True)
    parser.add_argument("--a", default="", help="extra `tapserve serve` flags of side A")
    parser.add_argument("--b", default="", help="extra `tapserve serve` flags of side B")
    parser.add_argument("--a-env", default="", help="KEY=VALUE,... for side A")
    parser.add_argument("--b-env", default="", help="KEY=VALUE,... for side B")
    parser.add_argument("--a-models", default=None,
                        help="side A's repository under bench/out/models (default: the "
                        "scenario's), e.g. --b-models s3_separate for shared passes off, "
                        "s3_shared_nodedup for dedup_rows off; scenario 4: s4_dedup, "
                        "s4_shared, s4_separate_dedup, s4_separate")
    parser.add_argument("--b-models", default=None)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight (default: the scenario's headline)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop at this many requests per second (Poisson) instead "
                        "of --concurrency clients: then compare latencies, not req/s")
    parser.add_argument("--door", choices=DOORS, default="kserve_grpc",
                        help="the front door the load goes through (bench/load.py's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds/window")
    parser.add_argument("--warmup", type=float, default=1.0, help="load seconds before each")
    parser.add_argument("--delay-ms", type=float, default=4.0, help="scenario 2's max delay")
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    args = parser.parse_args()
    out = args.out.resolve()
    (out / "ab").mkdir(parents=True, exist_ok=True)
    wanted = [out / "models" / m for m in ("s1", "s4_dedup", args.a_models, args.b_models) if m]
    if not all(folder.exists() for folder in wanted):
        log(f"building models into {out / 'models'}")
        build_models(out / "models")
    repo, model = repository(args.scenario, out / "models", args.delay_ms), MODEL[args.scenario]
    concurrency = args.concurrency or HEADLINE[args.scenario]
    sides, targets = {}, {}
    for side, flags, env, models in (("A", args.a, args.a_env, args.a_models),
                                     ("B", args.b, args.b_env, args.b_models)):
        port = free_port()
        folder = out / "models" / models if models else repo
        command = serve_command(folder, port, free_port()) + shlex.split(flags)
        targets[side] = f"127.0.0.1:{port}"
        if "_http" in args.door:  # the last --http-port wins
            targets[side] = f"127.0.0.1:{free_port()}"
            command += ["--http-port", targets[side].rpartition(":")[2]]
        sides[side] = ServerProcess(side, command, out / "ab" / f"{side}.log", port, [model],
                                    env=dict(kv.split("=", 1) for kv in env.split(",") if kv))
    results: dict[str, list[dict]] = {"A": [], "B": []}
    with running(sides["A"]), running(sides["B"]):
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")  # neither always goes first
            for side in order:
                load = measure(sides[side], request_mix(args.scenario), concurrency, out, args,
                               f"ab_{side}{r}", mix=MIX.get(args.scenario, "random"),
                               rate=args.rate, door=args.door, target=targets[side]).load
                results[side].append({k: load[k] for k in ("req_per_s", "p50_ms", "p99_ms")}
                                     | {"server_cores": load.get("server_cpu_cores")})
    summary = {side: {k: statistics.median(w[k] for w in windows)
                      for k in ("req_per_s", "p50_ms", "p99_ms")}
               for side, windows in results.items()}
    # Each round's B over the same round's A: background load that drifts over the run
    # moves both sides of a round together, so the ratio cancels it.
    paired = [b["req_per_s"] / a["req_per_s"]
              for a, b in zip(results["A"], results["B"], strict=True)]
    ratio = statistics.median(paired)
    # Open loop (--rate): both sides serve the same req/s; latency is what differs.
    latency = {q: statistics.median(b[q] / a[q] for a, b in
                                    zip(results["A"], results["B"], strict=True))
               for q in ("p50_ms", "p99_ms")}
    report = {"scenario": args.scenario, "door": args.door, "concurrency": concurrency,
              "a": args.a,
              "b": args.b, "a_env": args.a_env, "b_env": args.b_env,
              "a_models": args.a_models, "b_models": args.b_models, "windows": results,
              "median": summary, "b_over_a_per_round": paired,
              "b_over_a_req_per_s": ratio, "b_over_a_latency": latency,
              "command": " ".join(sys.argv)}
    (out / "ab.json").write_text(json.dumps(report, indent=2))
    for side in ("A", "B"):
        s = summary[side]
        what = " ".join(filter(None, (getattr(args, side.lower()),
                                      getattr(args, f"{side.lower()}_env"),
                                      getattr(args, f"{side.lower()}_models"))))
        print(f"{side} ({what or 'defaults'}): median "
              f"{s['req_per_s']:.0f} req/s, p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms; "
              f"windows {[round(w['req_per_s']) for w in results[side]]}")
    print(f"B / A req/s, median of the rounds' ratios: {ratio:.3f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in paired)})")
    print(f"B / A latency, median of the rounds' ratios: p50 {latency['p50_ms']:.3f}, "
          f"p99 {latency['p99_ms']:.3f}")


if __name__ == "__main__":
    main()
