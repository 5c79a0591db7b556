"""The model repository on disk: which models exist, their versions, files and config.

Read-only and stateless: the registry compares what it serves against a fresh `scan`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py

from service.config import NAME_PATTERN, ModelConfig, load_config
from service.errors import ConfigError

log = logging.getLogger(__name__)

# Looked for in this order inside a version folder.
FORMATS = {"model.keras": "keras", "model.h5": "h5", "saved_model.pb": "saved_model"}


@dataclass(frozen=True)
class ModelSource:
    """One version of one model to load: its files and its config."""

    name: str
    version: int
    path: Path  # the model file, or the SavedModel folder
    format: str  # "keras" | "h5" | "saved_model"
    config: ModelConfig

    @property
    def folder(self) -> Path:
        """The version folder (where `code:` entries live)."""
        return self.path if self.format == "saved_model" else self.path.parent


@dataclass(frozen=True)
class VersionOnDisk:
    folder: Path
    stamp: str  # changes whenever a file in the folder changes
    changed: float  # newest modification time in the folder (time.time() clock)


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

    def source(self, version: int, config: ModelConfig) -> ModelSource:
        path, fmt = find_model_file(self.versions[version].folder)
        return ModelSource(self.name, version, path, fmt, config)


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


def check_model_file(path: Path, fmt: str) -> None:
    """Refuse a model file that is not what its name says, before a library reports it in
    its own words (Keras calls a garbage .keras file "not found")."""
    if fmt == "keras" and not zipfile.is_zipfile(path):
        raise ConfigError(f"{path.name} is not a valid .keras file (a zip archive saved by "
                          "model.save): replace it", category="its model file is not valid")
    if fmt == "h5" and not h5py.is_hdf5(path):
        raise ConfigError(f"{path.name} is not a valid .h5 file (HDF5): replace it",
                          category="its model file is not valid")


def find_model_file(folder: Path) -> tuple[Path, str]:
    """The model file of one version folder and its format."""
    for filename, fmt in FORMATS.items():
        if (folder / filename).exists():
            return (folder if fmt == "saved_model" else folder / filename), fmt
    raise ConfigError(f"{folder} holds none of {', '.join(FORMATS)}",
                      category="its version folder holds no model file")


def _stamp(folder: Path) -> tuple[str, float]:
    """A digest of every file's path, size and mtime under `folder`, and the newest mtime."""
    digest, newest = hashlib.sha256(), folder.stat().st_mtime
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts:  # written by importing the model's own code
            continue
        info = path.stat()
        newest = max(newest, info.st_mtime)
        digest.update(f"{path.relative_to(folder)}\0{info.st_size}\0{info.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest(), newest


def scan(repository: Path, name: str) -> ModelOnDisk | None:
    """Model `name` as it is on disk now, or None when its folder is gone."""
    folder = repository / name
    try:
        versions = {}
        for p in folder.iterdir():
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0:
                stamp, changed = _stamp(p)
                versions[int(p.name)] = VersionOnDisk(p, stamp, changed)
        config_file = folder / "config.yaml"
        config_stamp = (hashlib.sha256(config_file.read_bytes()).hexdigest()
                        if config_file.exists() else "")
    except FileNotFoundError:  # removed while we looked
        return None if not folder.exists() else scan(repository, name)
    try:
        config, error = load_config(config_file), ""
    except ConfigError as exc:
        config, error = None, str(exc)
    return ModelOnDisk(name, config, error, config_stamp, versions)


def source_for_path(path: Path) -> ModelSource:
    """A ModelSource for `tapserve inspect PATH`: a model file, version folder or model folder."""
    path = path.resolve()
    if path.is_file() or (path / "saved_model.pb").exists():
        fmt = FORMATS.get(path.name if path.is_file() else "saved_model.pb")
        if fmt is None:
            raise ConfigError(f"{path}: not a model.keras, model.h5 or SavedModel folder")
        folder = path.parent if path.is_file() else path
        model_dir = folder.parent if folder.name.isdigit() else folder
        config = load_config(model_dir / "config.yaml")
        version = int(folder.name) if folder.name.isdigit() else 1
        return ModelSource(model_dir.name, version, path, fmt, config)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        disk = scan(path.parent, path.name)
        if disk is None or disk.config is None:
            raise ConfigError(disk.config_error if disk else f"{path} does not exist")
        served = disk.config.select(disk.versions)
        if not served:
            raise ConfigError(f"model {path.name!r}: config.yaml's version policy selects none "
                              f"of the versions {sorted(disk.versions)}")
        return disk.source(max(served), disk.config)
    if path.is_dir():
        file, fmt = find_model_file(path)
        return ModelSource(path.name, 1, file, fmt, load_config(path / "config.yaml"))
    raise ConfigError(f"{path} does not exist")
