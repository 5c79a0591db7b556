"""A model repository in object storage (`s3://bucket/prefix`, `gs://bucket/prefix`),
mirrored into a local folder that the registry reads as it reads any repository.

A version reaches the mirror whole or not at all: it is downloaded only once its objects
stopped changing (its listing stayed the same for the quiet interval, the rule folders
follow), into a hidden staging folder first, then renamed into place. A version gone from
the bucket leaves the mirror, so the registry unloads it as it would a removed folder.
Listing and downloading run on a worker thread, never on the event loop. Credentials come
from the provider's own environment (`AWS_*`, `GOOGLE_APPLICATION_CREDENTIALS`) through
its library and are never seen, let alone logged, here.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeGuard

from service.errors import ConfigError
from service.metrics import Metrics

log = logging.getLogger(__name__)

# URL scheme -> (the fsspec implementation's module, the extra that installs it).
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}
URL = re.compile(r"(?P<scheme>[a-z0-9]+)://(?P<bucket>[^/]*)/?(?P<prefix>.*)")
# Bucket names of both providers; anything else (a "key:secret@" user part) is refused
# unechoed, so a credential pasted into the URL never reaches a log.
BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]")
TIMEOUT_S = 30.0  # per request: connecting, and waiting for the next bytes
STAGING = ".incoming"  # hidden: model_names skips it
CLOSE_S = 10.0  # at exit, how long a pass under way gets to stop before the folder goes


def is_url(repository: str | Path) -> TypeGuard[str]:
    """True for a repository given as a URL (`scheme://...`), which must be one we serve."""
    return isinstance(repository, str) and "://" in repository


def check_url(url: str) -> str:
    """The URL, or ValueError saying what a repository URL looks like."""
    match = URL.fullmatch(url)
    if not match or match["scheme"] not in SCHEMES:
        raise ValueError("a model repository URL is s3://bucket/prefix or gs://bucket/prefix")
    if not BUCKET.fullmatch(match["bucket"]):
        raise ValueError(f"the bucket of the {match['scheme']}:// model repository is not a "
                         "valid bucket name (credentials belong in the provider's environment "
                         "variables, never in the URL)")
    return url


# One object: (size, a tag that changes with its contents, modification time).
Stamp = tuple[int, str, float]


@dataclass(frozen=True)
class Pending:
    """A version whose objects changed: downloaded once `listing` stays the same for the
    quiet interval (`seen`, monotonic) since it was first seen (`seen_at`, wall clock)."""

    listing: dict[str, Stamp]
    seen: float
    seen_at: float


class Mirror:
    """The bucket's models in a local folder (`folder`), brought up to date by `refresh`."""

    def __init__(self, url: str, metrics: Metrics) -> None:
        match = URL.fullmatch(check_url(url))
        assert match is not None
        self.url = url
        self._root = f"{match['bucket']}/{match['prefix'].strip('/')}".rstrip("/")
        self._fs = _filesystem(match["scheme"])
        self._metrics = metrics
        metrics.repository_failures.labels(url)  # 0 from the start, for increase()
        # Made on the first refresh: a server that fails to start leaves nothing behind.
        self.folder = Path(tempfile.gettempdir()) / f"tapserve-models-{uuid.uuid4().hex}"
        self._versions: dict[tuple[str, str], dict[str, Stamp]] = {}  # what the mirror holds
        self._files: dict[str, Stamp] = {}  # model-level files it holds (config.yaml)
        self._pending: dict[tuple[str, str], Pending] = {}
        self._failing: set[str] = set()  # what failed on the last try, logged once a streak
        self._listed = False  # the bucket was listed once
        self._lock = asyncio.Lock()
        # Its own thread: at exit, a pass under way is waited for before the folder goes.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mirror")
        self._closing = False

    async def refresh(self, quiet: float) -> bool:
        """Bring the mirror in step with the bucket; False when the bucket could not be
        listed (the mirror then stays as it was, so what serves keeps serving)."""
        async with self._lock:
            try:
                errors = await asyncio.get_running_loop().run_in_executor(
                    self._thread, self._sync, quiet)
            except Exception as exc:  # any library's network or permission error
                errors = {"": f"cannot list {self.url}: {_why(exc)}"}
        self._metrics.repository_reachable.labels(self.url).set(0 if "" in errors else 1)
        for what, error in errors.items():
            self._metrics.repository_failures.labels(self.url).inc()
            if what not in self._failing:
                log.error("model repository: %s (what serves keeps serving; retrying every "
                          "poll)", error)
        for what in self._failing - set(errors):
            log.info("model repository: %s reads again", what or self.url)
        self._failing = set(errors)
        if "" not in errors and not self._listed:
            self._listed = True
            log.info("model repository %s: mirrored into %s", self.url, self.folder)
        return "" not in errors

    async def close(self) -> None:
        """Stop refreshing (a pass under way stops at its next version) and delete the
        local folder."""
        self._closing = True
        try:
            await asyncio.wait_for(asyncio.to_thread(
                self._thread.shutdown, wait=True, cancel_futures=True), CLOSE_S)
        except TimeoutError:
            log.warning("model repository: a read of %s still under way at exit", self.url)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _sync(self, quiet: float) -> dict[str, str]:
        """One pass: list, download what settled, delete what left. Returns the errors by
        what failed ("<model>/<version>", a model file); listing errors raise."""
        versions, files = self._list()
        if self._closing:
            return {}
        self.folder.mkdir(mode=0o700, exist_ok=True)
        now, now_at = time.monotonic(), time.time()
        errors = {}
        for rel, stamp in files.items():
            if self._files.get(rel) != stamp:
                try:
                    self._fetch_file(rel, stamp)
                except Exception as exc:
                    errors[rel] = f"cannot download {rel}: {_why(exc)}"
        for rel in set(self._files) - set(files):
            (self.folder / rel).unlink(missing_ok=True)
            del self._files[rel]
        for key, listing in versions.items():
            if self._versions.get(key) == listing:
                self._pending.pop(key, None)
                continue
            pending = self._pending.get(key)
            if pending is None or pending.listing != listing:
                pending = self._pending[key] = Pending(listing, now, now_at)
            if now - pending.seen < quiet:
                continue  # still being uploaded, maybe
            if self._closing:
                break
            try:
                self._fetch_version(key, pending)
            except Exception as exc:
                errors["/".join(key)] = f"cannot download {'/'.join(key)}: {_why(exc)}"
        for key in set(self._versions) - set(versions):
            log.info("model repository: %s/%s left the bucket", *key)
            _remove(self.folder / key[0] / key[1], self.folder / STAGING)
            del self._versions[key]
        for key in set(self._pending) - set(versions):
            del self._pending[key]
        held = {m for m, _ in self._versions} | {rel.split("/")[0] for rel in self._files}
        for model in {p.name for p in self.folder.iterdir()} - held - {STAGING}:
            _remove(self.folder / model, self.folder / STAGING)
        return errors

    def _list(self) -> tuple[dict[tuple[str, str], dict[str, Stamp]], dict[str, Stamp]]:
        """The bucket's objects: by version ("<model>/<version>/<path>"), and the
        model-level files ("<model>/<file>"). Keys that could not be a path of the
        repository (".." parts, hidden names, root-level files) are left out."""
        versions: dict[tuple[str, str], dict[str, Stamp]] = {}
        files = {}
        objects = self._fs.find(self._root, detail=True)
        for name, info in objects.items():
            if info.get("type", "file") != "file" or name.endswith("/"):
                continue  # a console's "folder" marker
            parts = name[len(self._root):].strip("/").split("/")
            if len(parts) < 2 or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
                continue
            if len(parts) >= 3 and parts[1].isdigit():
                versions.setdefault((parts[0], parts[1]), {})["/".join(parts[2:])] = (
                    _stamp(info))
            elif len(parts) == 2:
                files["/".join(parts)] = _stamp(info)
        return versions, files

    def _fetch_file(self, rel: str, stamp: Stamp) -> None:
        target = self.folder / rel
        target.parent.mkdir(exist_ok=True)
        staged = self.folder / STAGING / f"{uuid.uuid4().hex}.{target.name}"
        staged.parent.mkdir(exist_ok=True)
        self._fs.get_file(f"{self._root}/{rel}", str(staged))
        os.replace(staged, target)  # atomic: the registry never reads half a config.yaml
        self._files[rel] = stamp

    def _fetch_version(self, key: tuple[str, str], pending: Pending) -> None:
        """Download a version whole into a staging folder, then rename it into place."""
        model, version = key
        log.info("model repository: downloading %s/%s (%d files)", model, version,
                 len(pending.listing))
        staging = self.folder / STAGING / f"{model}-{version}-{uuid.uuid4().hex}"
        try:
            remote, local = [], []
            for rel in pending.listing:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                remote.append(f"{self._root}/{model}/{version}/{rel}")
                local.append(str(staging / rel))
            self._fs.get(remote, local)  # concurrently (a SavedModel's variable shards)
            missing = [r for r in local if not os.path.isfile(r)]
            if missing:
                raise FileNotFoundError(f"not downloaded: {missing[0]}")
            (self.folder / model).mkdir(exist_ok=True)
            target = self.folder / model / version
            if target.exists():
                _remove(target, self.folder / STAGING)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # Every file's time is when this listing was first seen: the registry's own settle
        # rule then already holds, and its stamp of the folder changes with every change
        # in the bucket (even one that keeps a file's size and second of modification).
        for path in [*target.rglob("*"), target]:
            os.utime(path, (pending.seen_at, pending.seen_at))
        self._versions[key] = pending.listing
        self._pending.pop(key, None)


def _filesystem(scheme: str) -> Any:
    """The fsspec filesystem for `scheme`, with no caches (every pass lists anew) and
    bounded waits, so an unreachable endpoint fails a pass in seconds."""
    module_name, extra = SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(f"a {scheme}:// model repository needs {module_name}: "
                          f"pip install 'tapserve[{extra}]'") from None
    if scheme == "s3":
        return module.S3FileSystem(
            skip_instance_cache=True, use_listings_cache=False,
            config_kwargs={"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S,
                           "retries": {"max_attempts": 3, "mode": "standard"}})
    return module.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False,
                                requests_timeout=TIMEOUT_S)


def _stamp(info: dict[str, Any]) -> Stamp:
    """(size, tag, modified) of a listing entry, from s3fs's or gcsfs's field names."""
    tag = info.get("generation") or info.get("ETag") or info.get("etag") or ""
    modified = info.get("LastModified") or info.get("updated") or info.get("mtime")
    if isinstance(modified, str):
        modified = datetime.fromisoformat(modified.replace("Z", "+00:00"))
    seconds = modified.timestamp() if isinstance(modified, datetime) else 0.0
    return int(info.get("size") or 0), str(tag), seconds


def _remove(path: Path, staging: Path) -> None:
    """Delete a folder: first renamed out of the repository (one atomic step for the
    registry), then removed."""
    staging.mkdir(exist_ok=True)
    gone = staging / f"gone-{uuid.uuid4().hex}"
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def _why(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
