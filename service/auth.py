"""Bearer tokens: a file of accepted tokens, re-read when it changes, and the one check both
front ends (the gRPC interceptor, the HTTP middleware) make with it."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from service.errors import ConfigError, Unauthenticated

log = logging.getLogger(__name__)

# The gRPC methods that need no token: health (grpc.health.v1 and the KServe v2 liveness
# and readiness calls, as Triton's "health" group) and reflection, for probes and tools.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
OPEN_GRPC_METHODS = frozenset(
    f"/inference.GRPCInferenceService/{m}" for m in ("ServerLive", "ServerReady", "ModelReady"))


# The repository API (load, unload, index): with --admin-token-file, only its tokens open
# it, as Triton restricts it with a credential of its own.
REPOSITORY_GRPC_METHODS = frozenset(
    f"/inference.GRPCInferenceService/{m}"
    for m in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"))


def open_grpc_method(method: str) -> bool:
    return method in OPEN_GRPC_METHODS or method.startswith(OPEN_GRPC_PREFIXES)


class Access:
    """Which tokens a call needs: none for the open calls, the admin tokens for the
    repository API when there are any, the inference tokens for the rest (None: that set
    is off, and its calls are open)."""

    def __init__(self, tokens: Tokens | None, admin: Tokens | None) -> None:
        self.tokens = tokens
        self.admin = admin

    def needed(self, repository: bool) -> Tokens | None:
        return self.admin if repository and self.admin is not None else self.tokens

    def refresh(self) -> None:
        for tokens in (self.tokens, self.admin):
            if tokens is not None:
                tokens.refresh()


class Tokens:
    """The tokens of a file: one a line; blank lines and lines starting with # are skipped.

    A file that cannot be read or parsed at start is a ConfigError; later, the tokens in
    use are kept (and a warning says why) until the file is usable again and holds a
    token. Tokens are never logged: messages name line numbers.
    """

    def __init__(self, path: Path, flag: str = "--auth-token-file") -> None:
        self.path = path
        self.flag = flag  # named in refusals, which must not name the file's path
        self._stamp = self._stat()
        self._tokens = self._read()
        if not self._tokens:
            log.warning("%s holds no token: every call that needs one is refused", path)

    def _stat(self) -> tuple[int, ...] | None:
        try:
            s = os.stat(self.path)
        except OSError:
            return None
        return s.st_ino, s.st_dev, s.st_size, s.st_mtime_ns

    def _read(self) -> tuple[bytes, ...]:
        try:
            text = self.path.read_bytes().decode("ascii")
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"the token file {self.path} is not ASCII: tokens are printable "
                              "ASCII, one a line") from None
        tokens = []
        for number, line in enumerate(text.splitlines(), start=1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if not token.isprintable():
                raise ConfigError(f"line {number} of the token file {self.path} holds a "
                                  "control character: tokens are printable ASCII")
            tokens.append(token.encode())
        return tuple(tokens)

    def refresh(self) -> None:
        """Re-read the file if it changed (stat); cheap enough to call every second."""
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        self._stamp = stamp  # taken before reading: a write during it shows next time
        try:
            tokens = self._read()
        except ConfigError as exc:
            log.warning("keeping the tokens in use: %s", exc)
            return
        if not tokens:
            # A file rewritten in place is empty for a moment, as a half-written certificate
            # pair does not fit: keep the tokens in use until the file holds one.
            log.warning("keeping the tokens in use: %s holds no token", self.path)
            return
        if tokens != self._tokens:
            self._tokens = tokens
            log.info("tokens reloaded from %s (%d tokens)", self.path, len(tokens))

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is `Bearer <an accepted token>`."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("this call needs a bearer token: send the header "
                                  "'authorization: Bearer <token>'")
        candidate = token.strip().encode("utf-8", "replace")
        accepted = False
        for known in self._tokens:  # every token compared, in constant time each
            accepted |= hmac.compare_digest(candidate, known)
        if not accepted:
            raise Unauthenticated("the bearer token is not accepted: check it against the "
                                  f"server's token file ({self.flag})")
