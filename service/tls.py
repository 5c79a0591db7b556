"""TLS for the gRPC and HTTP ports, with certificates re-read when their files change.

cert-manager and Kubernetes Secret volumes replace certificate files in place; each port
picks the new ones up for new connections, without a restart. Connections already open
keep the certificate they were made with, so no request is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import ConfigError

log = logging.getLogger(__name__)
PLAINTEXT_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Material:
    """The PEM bytes of one consistent certificate, key and (mTLS) client CA."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


class CertificateFiles:
    """The certificate, key and client CA files of one port.

    `changed()` returns new, checked Material when the files' contents changed since the
    last Material it returned, else None; files that are missing or do not fit together
    (a rotation caught half-way) keep the Material in use. Thread-safe: gRPC calls it
    from its own threads, on every new connection, so an unchanged file costs a stat.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None, port: str) -> None:
        self._paths = (cert, key) + ((client_ca,) if client_ca else ())
        self._port = port
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self.current = self._read()  # ConfigError at start: nothing is served yet

    @property
    def mutual(self) -> bool:
        return len(self._paths) == 3

    def _stamps(self) -> tuple[tuple[int, ...], ...] | None:
        # os.stat follows the symlinks a Secret volume swaps atomically.
        try:
            return tuple((s.st_ino, s.st_dev, s.st_size, s.st_mtime_ns)
                         for s in map(os.stat, self._paths))
        except OSError:
            return None

    def _read(self) -> Material:
        contents = []
        for path in self._paths:
            try:
                contents.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read TLS file {path}: {exc.strerror}") from None
        material = Material(contents[0], contents[1], contents[2] if self.mutual else None)
        server_context(material, self._paths)  # raises ConfigError unless they fit together
        return material

    def changed(self) -> Material | None:
        with self._lock:
            stamp = self._stamps()
            if stamp is None or stamp == self._stamp:
                return None
            self._stamp = stamp  # taken before reading: a write during it shows next time
            try:
                material = self._read()
            except ConfigError as exc:
                log.warning("%s TLS files changed but cannot be used yet, keeping the "
                            "certificate in use: %s", self._port, exc)
                return None
            if material == self.current:
                return None
            self.current = material
            log.info("%s TLS certificate reloaded from %s", self._port, self._paths[0])
            return material


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    # OpenSSL loads a certificate chain and key from paths only: an anonymous in-memory
    # file holds exactly the bytes read (no private key copied to disk).
    fd = os.memfd_create("tapserve-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def server_context(material: Material, paths: tuple[Path, ...] = ()) -> ssl.SSLContext:
    """A server SSLContext for `material`; ConfigError naming the files if it is unusable."""
    names = " and ".join(str(p) for p in paths[:2]) or "the TLS certificate and key"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with _memory_file(material.cert) as cert, _memory_file(material.key) as key:
            context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{names} are not a PEM certificate chain and its private key "
                          f"({exc.reason or exc})") from None
    if material.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            ca = paths[2] if len(paths) > 2 else "the client CA file"
            raise ConfigError(f"{ca} holds no PEM CA certificate ({exc.reason or exc})") from None
    return context


def _grpc_config(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca)


def grpc_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Server credentials whose certificate gRPC asks `files` for on each new connection."""

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            material = files.changed()
        except Exception:  # an exception must not reach gRPC's core thread
            log.exception("gRPC TLS reload failed; keeping the certificate in use")
            return None
        return _grpc_config(material) if material is not None else None

    # grpc's stub types the fetcher as never returning None; gRPC's documented contract is
    # that None means "no change, keep the current certificate".
    return grpc.dynamic_ssl_server_credentials(
        _grpc_config(files.current), fetch,  # type: ignore[arg-type]  # see above
        require_client_authentication=files.mutual)


def _plaintext_noticed(notice: Callable[[], None]) -> type[ssl.SSLObject]:
    """An SSLObject class that calls `notice` when a handshake fails on a plaintext HTTP
    request: asyncio closes such a connection without a word in the log."""

    class Connection(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except ssl.SSLError as exc:
                if exc.reason == "HTTP_REQUEST":
                    notice()
                raise

    return Connection


class HttpTls:
    """The SSLContext the HTTP port listens with; `refresh()` re-reads the files.

    asyncio binds one SSLContext to a listening socket, so the new certificate is put in
    at each handshake: the context's SNI callback (called with or without SNI) swaps the
    connection onto the newest context before the certificate is chosen.
    """

    def __init__(self, files: CertificateFiles) -> None:
        self._files = files
        self.context = server_context(files.current)
        self._newest = self.context
        self.context.sni_callback = self._select
        self.context.sslobject_class = _plaintext_noticed(self._plaintext_client)
        self._plaintext_said_at = -math.inf
        self._plaintext_since = 0

    def _plaintext_client(self) -> None:
        # A client's mistake, so said at most once a minute with a count, not per request.
        self._plaintext_since += 1
        now = time.monotonic()
        if now - self._plaintext_said_at >= PLAINTEXT_LOG_INTERVAL_S:
            log.warning("%d plaintext HTTP request(s) reached the HTTP port, which serves TLS "
                        "only: clients must use https:// (the connection is closed, so they "
                        "see an empty reply)", self._plaintext_since)
            self._plaintext_said_at, self._plaintext_since = now, 0

    def _select(self, connection: ssl.SSLObject, server_name: str | None,
                context: ssl.SSLContext) -> None:
        if self._newest is not context:
            connection.context = self._newest

    def refresh(self) -> None:
        material = self._files.changed()
        if material is not None:
            self._newest = server_context(material)
