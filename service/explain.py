"""Explanations as endpoints (SPEC "Explanations"): the load-time checks, the optional
`target` input, and the gradient computations on TensorFlow.

An explain endpoint's `source` is its `Explanation`: its requests batch with each other,
never with a forward pass (their cost differs). Integrated gradients turns each row into
`steps` rows, so a row of it counts as `steps` rows against the batch and queue limits
(`Explanation.row_cost`), and `TensorFlowExplainer` computes them in chunks of at most
max_batch_size rows. A backend other than TensorFlow provides its own explainer behind
the runtime's `_explain`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

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


# ---- TensorFlow -------------------------------------------------------------------------


def _pick(scores: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Each row's score of its target class (its argmax where the target is NO_TARGET)."""
    best = tf.argmax(scores, axis=-1, output_type=tf.int64)
    return tf.gather(scores, tf.where(target < 0, best, target), batch_dims=1)


def _gradient(tape: tf.GradientTape, score: tf.Tensor, x: tf.Tensor, wrt: str,
              missing: list[str]) -> tf.Tensor:
    grad = tape.gradient(score, x)
    if grad is None:  # known at trace time (warm-up): noted, and the explainer refused
        missing.append(wrt)
        return tf.zeros_like(x)
    return grad


class TensorFlowExplainer:
    """One explain endpoint's `tf.function`, traced once (the batch dimension is None)."""

    def __init__(self, graph: TapGraph, explanation: Explanation, max_rows: int) -> None:
        self.explanation = explanation
        self.max_rows = max(1, max_rows)
        e = explanation

        def sig(name: str) -> tf.TensorSpec:
            tap = graph.tap(name)
            return tf.TensorSpec((None, *tap.shape[1:]),
                                 tf.string if tap.dtype == STRING else tap.dtype)

        feed_sig = {n: sig(n) for n in e.inputs} | {TARGET: tf.TensorSpec((None,), tf.int64)}
        forward = graph.plan(e.inputs, [e.output])
        wrt, layer = str(e.input), str(e.layer)  # by kind, one of them is set
        missing: list[str] = []  # what the traced function found no gradient for
        self._fn: Callable[..., Any]
        if e.kind == GRADIENT:
            @tf.function(input_signature=[feed_sig])  # type: ignore[untyped-decorator]  # TF ships no types
            def gradient(feeds: dict[str, tf.Tensor]) -> tf.Tensor:
                x = feeds[wrt]
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    score = _pick(forward(feeds)[e.output], feeds[TARGET])
                return tf.cast(_gradient(tape, score, x, wrt, missing), tf.float32)

            self._fn = gradient.get_concrete_function()
        elif e.kind == GRADCAM:
            front = graph.plan(e.inputs, [layer])
            back = graph.plan((*e.inputs, layer), [e.output])

            @tf.function(input_signature=[feed_sig])  # type: ignore[untyped-decorator]  # TF ships no types
            def gradcam(feeds: dict[str, tf.Tensor]) -> tf.Tensor:
                a = front(feeds)[layer]
                with tf.GradientTape() as tape:
                    tape.watch(a)
                    score = _pick(back({**feeds, layer: a})[e.output], feeds[TARGET])
                g = _gradient(tape, score, a, layer, missing)
                # Each channel weighted by its mean gradient over the spatial axes.
                weights = tf.reduce_mean(g, axis=list(range(1, len(a.shape) - 1)),
                                         keepdims=True)
                return tf.cast(tf.nn.relu(tf.reduce_sum(weights * a, axis=-1)), tf.float32)

            self._fn = gradcam.get_concrete_function()
        else:
            alpha_sig = tf.TensorSpec((None,), tf.float32)

            @tf.function(input_signature=[feed_sig, alpha_sig])  # type: ignore[untyped-decorator]  # TF ships no types
            def integrated(feeds: dict[str, tf.Tensor], alphas: tf.Tensor) -> tf.Tensor:
                """The sum of the gradients at alpha * input for each alpha, per row."""
                x = feeds[wrt]
                k = tf.shape(alphas)[0]
                target = feeds[TARGET]  # resolved on the input itself, not its scaled copies
                best = tf.argmax(forward(feeds)[e.output], axis=-1, output_type=tf.int64)
                target = tf.repeat(tf.where(target < 0, best, target), k)
                scale = tf.reshape(tf.cast(alphas, x.dtype), [1, -1] + [1] * (len(x.shape) - 1))
                # Row r's copies are rows r*k .. r*k + k - 1.
                scaled = tf.reshape(x[:, None] * scale, tf.concat([[-1], tf.shape(x)[1:]], 0))
                others = {n: tf.repeat(v, k, axis=0) for n, v in feeds.items()
                          if n not in (wrt, TARGET)}
                with tf.GradientTape() as tape:
                    tape.watch(scaled)
                    scores = forward({**others, wrt: scaled})[e.output]
                    score = tf.gather(scores, target, batch_dims=1)
                g = tf.cast(_gradient(tape, score, scaled, wrt, missing), tf.float32)
                return tf.reduce_sum(tf.reshape(g, tf.concat([[-1, k], tf.shape(x)[1:]], 0)),
                                     axis=1)

            self._fn = integrated.get_concrete_function()
        if missing:  # the load refuses this endpoint, saying why
            raise ConfigError(f"endpoint {e.endpoint!r}: output {e.output!r} has no gradient "
                              f"with respect to {missing[0]!r} (the path between them is not "
                              "differentiable, e.g. an argmax or a cast to integers)")

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        e = self.explanation
        if e.kind != INTEGRATED:
            return np.asarray(self._fn(dict(feeds)))
        rows = len(feeds[TARGET])
        alphas = np.arange(1, e.steps + 1, dtype=np.float32) / e.steps  # right Riemann sum
        # At most max_rows scaled rows at once: a row of 256 steps must not take the
        # memory of 256 rows' activations (the batcher already counts a row as `steps`).
        chunk = max(1, self.max_rows // rows)
        total = sum(np.asarray(self._fn(dict(feeds), alphas[i:i + chunk]))
                    for i in range(0, e.steps, chunk))
        x = np.asarray(feeds[str(e.input)], dtype=np.float32)
        return x * (total / e.steps)  # baseline 0: (input - baseline) * mean gradient


class Explainers:
    """The runtime's explainers, one per explain endpoint, built on first use."""

    def __init__(self, graph: TapGraph, max_rows: int) -> None:
        self.graph = graph
        self.max_rows = max_rows
        self._built: dict[Explanation, TensorFlowExplainer] = {}
        self._lock = threading.Lock()

    def __call__(self, explanation: Explanation, feeds: Mapping[str, np.ndarray]) -> Arrays:
        with self._lock:  # built once: a trace holds the GIL for a while
            explainer = self._built.get(explanation)
            if explainer is None:
                explainer = TensorFlowExplainer(self.graph, explanation, self.max_rows)
                self._built[explanation] = explainer
        return {ATTRIBUTION: explainer(feeds)}
