"""`tapserve inspect`: what a saved model offers — inputs, outputs, taps, endpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.backends import Backend, current
from service.config import load_config
from service.errors import ConfigError
from service.loading import FORMATS, BuildOptions, find_model_file, model_source
from service.repository import ModelSource, scan
from service.types import TensorSpec


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in spec.shape) + "]"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def source_for_path(path: Path) -> ModelSource:
    """What `tapserve inspect PATH` describes: a model file, version folder or model folder."""
    path = path.resolve()
    folder_format = next((f for f in FORMATS.values()
                          if f.is_folder and (path / f.marker).exists()), None)
    if path.is_file() or folder_format:
        fmt = folder_format or next((f for f in FORMATS.values()
                                     if f.marker == path.name and not f.is_folder), None)
        if fmt is None:
            raise ConfigError(f"{path}: not a model.keras, model.h5 or SavedModel folder")
        folder = path if fmt.is_folder else path.parent
        model_dir = folder.parent if folder.name.isdigit() else folder
        config = load_config(model_dir / "config.yaml")
        version = int(folder.name) if folder.name.isdigit() else 1
        return ModelSource(model_dir.name, version, path, fmt.name, config)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        disk = scan(path.parent, path.name)
        if disk is None or disk.config is None:
            raise ConfigError(disk.config_error if disk else f"{path} does not exist")
        served = disk.config.select(disk.versions)
        if not served:
            raise ConfigError(f"model {path.name!r}: config.yaml's version policy selects none "
                              f"of the versions {sorted(disk.versions)}")
        version = max(served)
        return model_source(disk.name, version, disk.versions[version].folder, disk.config)
    if path.is_dir():
        file, fmt_name = find_model_file(path)
        return ModelSource(path.name, 1, file, fmt_name, load_config(path / "config.yaml"))
    raise ConfigError(f"{path} does not exist")


def describe(path: Path, backend: Backend | None = None) -> str:
    """A human-readable report of the model at `path` (not warmed up, nothing served), on
    `backend` (default: the one keras runs on)."""
    source = source_for_path(path)
    fmt = FORMATS[source.format]
    model = fmt.build(source, BuildOptions(backend=backend or current()))
    lines = [f"model {model.name} (version {model.version}, {source.format}: {source.path})"]
    for ep in model.endpoints.values():
        default = " (default)" if ep.name == model.default_endpoint else ""
        e = ep.explanation
        explains = "" if e is None else (
            f": explains {e.output!r} by {e.kind} "
            + (f"over layer {e.layer!r}" if e.layer else f"of input {e.input!r}")
            + (f", {e.steps} steps" if e.row_cost > 1 else "")
            + "; input 'target' is optional (default: each row's argmax)")
        lines.append(f"endpoint {model.name}.{ep.name}{default}{explains}")
        lines += _table([("", "name", "dtype", "shape")] + [
            (kind, s.name, s.dtype, _shape(s))
            for kind, specs in (("input", ep.inputs), ("output", ep.outputs)) for s in specs])
    for name, why in model.refused.items():
        lines.append(f"endpoint {model.name}.{name}: refused: {why}")
    graph = getattr(model.runtime, "graph", None)
    if graph is None:
        lines.append(f"taps: none ({fmt.no_taps or 'the model has no layer graph'})")
    else:
        lines.append(f"taps ({len(graph.taps)}):")
        lines += _table([("name", "layer", "dtype", "shape")] + [
            (t.name, t.layer, t.dtype, _shape(TensorSpec(t.name, t.dtype, t.shape)))
            for t in graph.taps.values()])
    model.runtime.close()
    return "\n".join(lines)
