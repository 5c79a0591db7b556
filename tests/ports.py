"""Ports for the servers tests start. Ask gRPC and metrics for port 0 where you can (the
server binds a free one and logs it); the HTTP port has no such value (0 turns it off), so
tests take one from here.

A port found free by binding port 0 comes from the kernel's ephemeral range, which it
also hands to outgoing connections: between the probe and the server's bind, a client
socket (of any test) may take it. Ports below that range are never handed out so, and
only another test picking the same port could collide, which the bind check makes rare."""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A port nothing holds now, outside the range outgoing connections draw from."""
    try:
        first_ephemeral = int(EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    candidates = random.Random()
    for _ in range(200):
        port = candidates.randrange(10000, max(first_ephemeral, 10001))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {first_ephemeral}")
