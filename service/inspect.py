"""`tapserve inspect`: what a saved model offers — inputs, outputs, taps, endpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.loading import build_keras_model, build_saved_model
from service.model import LoadedModel
from service.repository import source_for_path
from service.types import TensorSpec


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in spec.shape) + "]"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def describe(path: Path) -> str:
    """A human-readable report of the model at `path` (not warmed up, nothing served)."""
    source = source_for_path(path)
    if source.format == "saved_model":
        model: LoadedModel = build_saved_model(source, ["/CPU:0"], 1)
    else:
        model = build_keras_model(source, ["/CPU:0"], 1, cache_size=1, max_batch_size=1)
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
        lines.append("taps: none (a SavedModel has signatures only, no layer graph)")
    else:
        lines.append(f"taps ({len(graph.taps)}):")
        lines += _table([("name", "layer", "dtype", "shape")] + [
            (t.name, t.layer, t.dtype, _shape(TensorSpec(t.name, t.dtype, t.shape)))
            for t in graph.taps.values()])
    model.runtime.close()
    return "\n".join(lines)
