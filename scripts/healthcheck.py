"""Container health probe: exit 0 if the `tapserve serve` process answers SERVING.

The image's HEALTHCHECK runs it (`python /opt/tapserve/healthcheck.py`). It asks the gRPC
health service ("") on the ports the server process really listens on, read from /proc,
so it holds however the port was set: `serve --grpc-port 9001`, TAPSERVE_GRPC_PORT, the
default 8001, even port 0. It needs nothing of Tapserve's own code (only grpcio and
grpcio-health-checking), so it cannot drift from the server's flag parsing.

    python healthcheck.py [--pid PID] [--timeout SECONDS]

Without --pid it finds the server: the lowest PID whose command line is `... tapserve
serve ...` (PID 1 in the container, or its child under `docker run --init`). Every
listening TCP socket of that process is asked in turn; one SERVING answer is healthy.
The metrics port answers HTTP/1.1, so the gRPC call to it just fails. Exit 1 otherwise,
with one line per port saying why (`docker inspect` shows it under .State.Health).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LISTEN = "0A"  # TCP state in /proc/net/tcp


def server_pid() -> int | None:
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg) == "tapserve" and argv[i + 1] == "serve":
                return pid
    return None


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since listdir
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def address(hex_address: str) -> str:
    """/proc/net/tcp{,6}'s hex address, in host byte order per 32-bit word."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if ip.version == 6 and ip.ipv4_mapped:  # gRPC's IPv6 socket for an IPv4 address
        ip = ip.ipv4_mapped
    if ip.is_unspecified:  # bound to every address: loopback reaches it
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"[{ip}]" if ip.version == 6 else str(ip)


def listening(pid: int) -> list[str]:
    """host:port of every TCP socket the process listens on, in port order."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == LISTEN and inode in inodes:
                host, port = local.split(":")
                found.append((int(port, 16), address(host)))
    return [f"{host}:{port}" for port, host in sorted(set(found))]


def check(target: str, timeout: float) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, help="the server's PID (default: find it)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds in all")
    args = parser.parse_args(argv)
    pid = args.pid or server_pid()
    if pid is None:
        print("unhealthy: no `tapserve serve` process")
        return 1
    try:
        targets = listening(pid)
    except OSError as exc:
        print(f"unhealthy: cannot read process {pid}'s sockets: {exc}")
        return 1
    if not targets:
        print(f"unhealthy: process {pid} listens on no TCP port (yet)")
        return 1
    deadline = time.monotonic() + args.timeout
    for target in targets:
        status = check(target, max(0.1, deadline - time.monotonic()))
        print(f"{target}: {status}")
        if status == "SERVING":
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
