"""The model repository on disk: which models exist, which version and file each serves."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from service.config import NAME_PATTERN, ModelConfig, load_config
from service.errors import ConfigError

# Looked for in this order inside a version folder.
FORMATS = {"model.keras": "keras", "model.h5": "h5", "saved_model.pb": "saved_model"}


@dataclass(frozen=True)
class ModelSource:
    """Where one model's served version lives, and its config."""

    name: str
    version: int
    path: Path  # the model file, or the SavedModel folder
    format: str  # "keras" | "h5" | "saved_model"
    config: ModelConfig
    versions: tuple[int, ...]  # every version on disk


def model_names(repository: Path) -> list[str]:
    """Folders of the repository that name a model, sorted."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {str(repository)!r} is not a folder")
    return sorted(p.name for p in repository.iterdir()
                  if p.is_dir() and re.match(NAME_PATTERN, p.name))


def find_model_file(folder: Path) -> tuple[Path, str]:
    """The model file of one version folder and its format."""
    for filename, fmt in FORMATS.items():
        if (folder / filename).exists():
            return (folder if fmt == "saved_model" else folder / filename), fmt
    raise ConfigError(f"{folder} holds none of {', '.join(FORMATS)}")


def resolve(repository: Path, name: str) -> ModelSource:
    """The version to serve of model `name`: the highest, unless config.yaml pins one."""
    folder = repository / name
    config = load_config(folder / "config.yaml")
    versions = tuple(sorted(int(p.name) for p in folder.iterdir()
                            if p.is_dir() and p.name.isdigit() and int(p.name) > 0))
    if not versions:
        raise ConfigError(f"model {name!r}: no version folder (a positive integer) in {folder}")
    version = config.version or versions[-1]
    if version not in versions:
        raise ConfigError(f"model {name!r}: config.yaml asks for version {version}, "
                          f"but only {list(versions)} exist")
    path, fmt = find_model_file(folder / str(version))
    return ModelSource(name, version, path, fmt, config, versions)


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
        return ModelSource(model_dir.name, version, path, fmt, config, (version,))
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return resolve(path.parent, path.name)
    if path.is_dir():
        file, fmt = find_model_file(path)
        return ModelSource(path.name, 1, file, fmt, load_config(path / "config.yaml"), (1,))
    raise ConfigError(f"{path} does not exist")
