"""Clients that send part of a request body and stall: a raw HTTP/2 gRPC call (h2 over a
plain socket, since no gRPC client can be told to stop halfway through a message) and an
HTTP/1.1 POST with a Content-Length it never reaches; and the server's resident memory."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class StalledGrpcCall:
    """One connection, one ModelInfer call whose 5-byte gRPC prefix announces `declared`
    bytes, of which `send` are sent (as far as the server's flow-control window lets them
    in within `timeout`); then it stalls, holding the connection open. `accepted`: the
    bytes the server took; `refused`: the call was ended by the server before that, with
    gRPC status `status` (None: the connection was closed)."""

    def __init__(self, port: int, declared: int, send: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(timeout)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(self.stream, [
            (":method", "POST"), (":scheme", "http"), (":path", MODEL_INFER),
            (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
            ("te", "trailers")])
        self.accepted = 0
        self.refused = False
        self.status: int | None = None
        self._body = struct.pack(">BI", 0, declared) + b"\0" * send
        self._flush()
        deadline = time.monotonic() + timeout
        while self.accepted < len(self._body) and not self.refused:
            if time.monotonic() > deadline:
                break
            self._send_what_fits()
            if self.accepted < len(self._body) and not self.refused:
                self._read()

    def _send_what_fits(self) -> None:
        try:
            window = self.h2.local_flow_control_window(self.stream)
        except h2.exceptions.StreamClosedError:
            self.refused = True
            return
        size = min(window, self.h2.max_outbound_frame_size, len(self._body) - self.accepted)
        if size > 0:
            self.h2.send_data(self.stream, self._body[self.accepted:self.accepted + size])
            self.accepted += size
            self._flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except OSError:
            data = b""
        if not data:
            self.refused = True
            return
        for event in self.h2.receive_data(data):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    self.status = int(headers[b"grpc-status"])
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset,
                                  h2.events.ConnectionTerminated)):
                self.refused = True
        self._flush()  # settings and ping acknowledgements

    def wait_end(self, timeout: float) -> int | None:
        """Wait up to `timeout` s for the server to end the call; its gRPC status."""
        deadline = time.monotonic() + timeout
        while not self.refused and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            self._read()
        return self.status

    def _flush(self) -> None:
        try:
            self.sock.sendall(self.h2.data_to_send())
        except OSError:  # the server closed the connection
            self.refused = True

    def close(self) -> None:
        self.sock.close()


def stalled_http_post(port: int, path: str, declared: int, send: int) -> socket.socket:
    """An HTTP/1.1 POST announcing `declared` body bytes, `send` of them sent."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + b" " * send)
    return sock


def stalled_chunked_post(port: int, path: str, send: int) -> socket.socket:
    """A chunked HTTP/1.1 POST (no Content-Length) whose first chunk of `send` bytes is
    sent, and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Transfer-Encoding: chunked\r\n\r\n{send:x}\r\n".encode()
                 + b" " * send + b"\r\n")
    return sock


def half_a_header(port: int) -> socket.socket:
    """An HTTP/1.1 request whose header block is never finished."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-")
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes `sock` within `timeout` s (what it sends first is read
    and dropped)."""
    sock.settimeout(max(timeout, 0.01))
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def http_status(sock: socket.socket, timeout: float) -> int | None:
    """The status of the response the server sends on `sock` within `timeout` s."""
    sock.settimeout(max(timeout, 0.01))
    try:
        line = sock.recv(64)
    except (TimeoutError, OSError):
        return None
    return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else None


WATCH = "/grpc.health.v1.Health/Watch"
STREAMS_PER_CONNECTION = 100  # the server's --max-concurrent-streams default


class RawWatches:
    """`count` grpc.health.v1 Watch streams for `service`, on raw HTTP/2 connections of
    100 streams each, whose initial stream window is `window` (0: the client never lets the
    server send it a byte, and never reads). The streams stay open until close()."""

    def __init__(self, port: int, count: int, service: str = "", window: int = 65535) -> None:
        from grpc_health.v1 import health_pb2

        message = health_pb2.HealthCheckRequest(service=service).SerializeToString()
        body = struct.pack(">BI", 0, len(message)) + message
        self.connections: list[tuple[socket.socket, h2.connection.H2Connection]] = []
        self.streams: list[tuple[int, int]] = []  # (connection index, stream id)
        for first in range(0, count, STREAMS_PER_CONNECTION):
            sock = socket.create_connection(("127.0.0.1", port))
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            conn.initiate_connection()
            for _ in range(min(STREAMS_PER_CONNECTION, count - first)):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, [
                    (":method", "POST"), (":scheme", "http"), (":path", WATCH),
                    (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
                    ("te", "trailers")])
                conn.send_data(stream, body, end_stream=True)
                self.streams.append((len(self.connections), stream))
            sock.sendall(conn.data_to_send())
            self.connections.append((sock, conn))
        self.statuses: dict[tuple[int, int], int] = {}  # grpc-status of the streams ended

    def read(self, seconds: float) -> None:
        """Read what the server sends for `seconds` (settings and pings are answered; data
        is left unacknowledged), noting the grpc-status of each stream that ends."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for index, (sock, conn) in enumerate(self.connections):
                sock.settimeout(max(0.001, min(left, 0.05)))
                try:
                    data = sock.recv(65536)
                except (TimeoutError, OSError):
                    continue
                if not data:
                    continue
                for event in conn.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived,
                                          h2.events.TrailersReceived)):
                        headers = dict(event.headers)
                        if b"grpc-status" in headers:
                            self.statuses[index, event.stream_id] = int(headers[b"grpc-status"])
                with contextlib.suppress(OSError):
                    sock.sendall(conn.data_to_send())

    def close(self) -> None:
        for sock, _ in self.connections:
            sock.close()
