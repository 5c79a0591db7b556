"""Explanations as endpoints (SPEC "Explanations"): the load-time checks, the optional
`target` input. The gradient computations are the backends' (service/explain_tf.py,
service/explain_jax.py).

An explain endpoint's `source` is its `Explanation`: its requests batch with each other,
never with a forward pass (their cost differs). Integrated gradients turns each row into
`steps` rows, so a row of it counts as `steps` rows against the batch and queue limits
(`Explanation.row_cost`), and the backends' explainers compute them in chunks of at most
max_batch_size rows, behind the runtime's `_explain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.config import ExplainConfig
from service.errors import ConfigError, InvalidInput, NotFound
from service.graph import TapGraph
from service.types import STRING, TensorSpec
from service.validation import suggest

Arrays = dict[str, np.ndarray]

TARGET = "target"  # optional input: the class to explain per row (default: the argmax)
ATTRIBUTION = "attribution"  # the one output
TARGET_SPEC = TensorSpec(TARGET, "int64", (None,))
NO_TARGET = -1  # a row without a target: explain its argmax
GRADIENT, GRADCAM, INTEGRATED = "gradient", "gradcam", "integrated_gradients"
_FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Explanation:
    """What one explain endpoint computes; hashable, it is the endpoint's batching source."""

    endpoint: str
    kind: str
    inputs: tuple[str, ...]  # the model's inputs, fed as the request sends them
    input: str | None  # attributed to (gradient, integrated_gradients)
    output: str  # one score per class
    layer: str | None  # Grad-CAM's layer
    steps: int
    classes: int

    @property
    def row_cost(self) -> int:
        """Rows of compute one request row takes: integrated gradients runs `steps`."""
        return self.steps if self.kind == INTEGRATED else 1


def _shape(spec: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in spec) + "]"


def check(graph: TapGraph, where: str, endpoint: str, config: ExplainConfig
          ) -> tuple[Explanation, TensorSpec]:
    """The endpoint's Explanation and its `attribution` spec; ConfigError (saying what
    exists) if the config does not fit the model. `where` names the model and endpoint."""

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"{where}: {problem}", category="its config.yaml does not fit "
                           "the model (an explain endpoint)")

    inputs = tuple(graph.input_names)
    if TARGET in inputs:
        raise refuse(f"the model has an input named {TARGET!r}, which an explain endpoint "
                     "takes for the class to explain; rename that input")
    try:
        out = graph.tap(config.output)
    except NotFound:
        raise refuse(f"the model has no output or tap {config.output!r}; "
                     f"{suggest(config.output, graph.taps)}") from None
    classes = out.shape[1] if len(out.shape) == 2 else None
    if classes is None or out.dtype not in _FLOATS:
        scores = sorted(n for n, t in graph.taps.items() if n not in inputs
                        and len(t.shape) == 2 and t.shape[1] and t.dtype in _FLOATS)
        raise refuse(f"output {config.output!r} is {out.dtype} {_shape(out.shape)}, not one "
                     f"score per class (floating, [-1, classes]); taps that are: "
                     f"{', '.join(scores) or 'none'}")
    attributed: str | None = None
    if config.explain == GRADCAM:
        assert config.layer is not None  # ExplainConfig's own check
        try:
            layer = graph.tap(config.layer)
        except NotFound:
            raise refuse(f"the model has no layer (tap) {config.layer!r}; "
                         f"{suggest(config.layer, graph.taps)}") from None
        if len(layer.shape) < 3 or layer.dtype not in _FLOATS:
            spatial = sorted(n for n, t in graph.taps.items()
                             if len(t.shape) >= 3 and t.dtype in _FLOATS
                             and _feeds(graph, inputs, n, config.output))
            raise refuse(f"layer {config.layer!r} is {layer.dtype} {_shape(layer.shape)}: "
                         "Grad-CAM needs spatial axes ([-1, ..., channels], channels last); "
                         f"layers that have them and feed {config.output!r}: "
                         f"{', '.join(spatial) or 'none'}")
        if not _feeds(graph, inputs, config.layer, config.output):
            raise refuse(f"layer {config.layer!r} does not feed output {config.output!r}: "
                         "its gradient would be zero")
        spec = TensorSpec(ATTRIBUTION, "float32", layer.shape[:-1])
    else:
        if config.input is None and len(inputs) != 1:
            raise refuse(f"the model has inputs {list(inputs)}: say which to attribute to "
                         "with `input`")
        attributed = config.input or inputs[0]
        if attributed not in inputs:
            raise refuse(f"the model has no input {attributed!r}; its inputs: "
                         f"{', '.join(inputs)}")
        tap = graph.tap(attributed)
        if tap.dtype not in _FLOATS:
            floats = [n for n in inputs if graph.tap(n).dtype in _FLOATS]
            raise refuse(f"input {attributed!r} is {tap.dtype}: gradients need a floating "
                         f"input (floating inputs: {', '.join(floats) or 'none'}; "
                         "gradcam explains a layer instead)")
        if not _feeds(graph, inputs, attributed, config.output):
            raise refuse(f"input {attributed!r} does not feed output {config.output!r}")
        spec = TensorSpec(ATTRIBUTION, "float32", tap.shape)
    explanation = Explanation(endpoint, config.explain, inputs, attributed, config.output,
                              config.layer, config.steps, classes)
    return explanation, spec


def _feeds(graph: TapGraph, inputs: Sequence[str], tap: str, output: str) -> bool:
    """Whether `output` depends on `tap` (computed from the model's `inputs`)."""
    try:
        plan = graph.plan(tuple(dict.fromkeys((*inputs, tap))), [output])
    except NotFound:  # e.g. a tap inside a nested model's own inputs: not a cut point
        return False
    return graph.tap(tap).key in plan.feeds


def targets(explanation: Explanation, target: np.ndarray | None, rows: int) -> np.ndarray:
    """A request's `target` input, checked, as int64 of one per row (NO_TARGET: argmax)."""
    if target is None:
        return np.full(rows, NO_TARGET, dtype=np.int64)
    dtype = STRING if target.dtype == object else target.dtype.name
    if dtype not in ("int32", "int64"):
        raise InvalidInput(f"input {TARGET!r} must be INT32 or INT64 (a class index per "
                           f"row), got {dtype}")
    if target.shape not in ((rows,), (rows, 1)):
        raise InvalidInput(f"input {TARGET!r} has shape {list(target.shape)}; expected "
                           f"[{rows}] (one class index per row of the other inputs)")
    flat = target.reshape(rows).astype(np.int64)
    bad = flat[(flat < 0) | (flat >= explanation.classes)]
    if bad.size:
        raise InvalidInput(f"input {TARGET!r} holds {bad[:5].tolist()}: output "
                           f"{explanation.output!r} has classes 0..{explanation.classes - 1}")
    return flat
