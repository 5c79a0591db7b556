"""The model repository on disk: which models exist, their versions, files and config.

Read-only and stateless: the registry compares what it serves against a fresh `scan`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from service.config import NAME_PATTERN, ModelConfig, load_config
from service.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """One version of one model to load: its files and its config."""

    name: str
    version: int
    path: Path  # the model file, or the SavedModel folder
    format: str  # a name in loading.FORMATS: "keras" | "h5" | "saved_model"
    config: ModelConfig

    @property
    def folder(self) -> Path:
        """The version folder (where `code:` entries live)."""
        return self.path if self.path.is_dir() else self.path.parent


@dataclass(frozen=True)
class VersionOnDisk:
    folder: Path
    stamp: str  # changes whenever a file in the folder changes
    changed: float  # newest modification time in the folder (time.time() clock)
    error: str = ""  # a file in it that cannot be read: this version cannot load


@dataclass(frozen=True)
class ModelOnDisk:
    """One model folder as it is now. `config` is None when config.yaml is unusable."""

    name: str
    config: ModelConfig | None
    config_error: str
    config_stamp: str
    versions: dict[int, VersionOnDisk]

    def settled(self, quiet_seconds: float) -> dict[int, VersionOnDisk]:
        """Versions whose files have not changed for `quiet_seconds`: a folder still being
        copied in must not be loaded half-written."""
        now = time.time()
        return {v: d for v, d in self.versions.items() if now - d.changed >= quiet_seconds}


def model_names(repository: Path, warned: set[str] | None = None) -> list[str]:
    """Folders of the repository that name a model, sorted. A folder whose name cannot be
    a model name is skipped, with a warning the first time `warned` (the names warned
    about so far; None: no warnings) sees it; hidden ones (".incoming", Kubernetes'
    "..data") silently."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {str(repository)!r} is not a folder")
    names = []
    for p in repository.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        # fullmatch: re.match's `$` also matches before a trailing newline ("m\n").
        if re.fullmatch(NAME_PATTERN, p.name):
            names.append(p.name)
        elif warned is not None and p.name not in warned:
            log.warning("model repository: skipping folder %r: a model folder's name is made "
                        "of letters, digits, '_' and '-' only (it is the model's name in "
                        "requests)", p.name)
            warned.add(p.name)
    return sorted(names)


def _stamp(folder: Path) -> tuple[str, float, str]:
    """A digest of every file's path, size and mtime under `folder`, the newest mtime, and
    why a file could not be read ("" when every one could).

    A symlink whose target is missing (an editor's lock file) is stamped as the link
    itself. A version folder removed meanwhile reads as empty: the next scan drops it."""
    digest, errors = hashlib.sha256(), []
    try:
        newest = folder.stat().st_mtime
    except FileNotFoundError:
        return digest.hexdigest(), 0.0, ""
    except OSError as exc:
        return digest.hexdigest(), 0.0, _unreadable(folder, exc)
    entries: list[Path] = []

    def walk_error(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            errors.append(_unreadable(Path(exc.filename or folder), exc))
    for root, dirs, files in os.walk(folder, onerror=walk_error):
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # written by importing model code
        entries += [Path(root, name) for name in dirs + files]
    for path in sorted(entries):
        try:
            info = path.stat()
        except FileNotFoundError:
            try:
                info = path.lstat()  # a dangling symlink: its target cannot matter
            except FileNotFoundError:  # removed while we looked
                continue
            except OSError as exc:
                errors.append(_unreadable(path, exc))
                continue
        except OSError as exc:  # no permission, a symlink loop: this version cannot load
            if path.is_symlink():
                info = path.lstat()
            else:
                errors.append(_unreadable(path, exc))
                continue
        newest = max(newest, info.st_mtime)
        digest.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\n"
                      .encode())
    error = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    digest.update(error.encode())
    return digest.hexdigest(), newest, error


def _unreadable(path: Path, exc: OSError) -> str:
    return f"cannot read {path}: {exc.strerror or exc}"


def scan(repository: Path, name: str) -> ModelOnDisk | None:
    """Model `name` as it is on disk now, or None when its folder is gone. A file that
    cannot be read is its version's problem (VersionOnDisk.error), never the scan's."""
    folder = repository / name
    try:
        children = list(folder.iterdir())
    except FileNotFoundError:
        return None
    except OSError as exc:  # said as the model's problem, where its config's would be
        return ModelOnDisk(name, None, _unreadable(folder, exc), str(exc), {})
    versions = {}
    for p in children:
        if p.name.isdigit() and int(p.name) > 0 and p.is_dir():
            stamp, changed, error = _stamp(p)
            versions[int(p.name)] = VersionOnDisk(p, stamp, changed, error)
    config_file = folder / "config.yaml"
    try:
        config_stamp = hashlib.sha256(config_file.read_bytes()).hexdigest()
    except FileNotFoundError:
        config_stamp = ""
    except OSError as exc:
        config_stamp = str(exc)
    try:
        config, error = load_config(config_file), ""
    except ConfigError as exc:
        config, error = None, str(exc)
    except OSError as exc:
        config, error = None, _unreadable(config_file, exc)
    return ModelOnDisk(name, config, error, config_stamp, versions)
