"""Explanations on TensorFlow: one `tf.function` per explain endpoint, gradients by
tf.GradientTape. Imported only on the TensorFlow backend."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from service.errors import ConfigError
from service.explain import ATTRIBUTION, GRADCAM, GRADIENT, INTEGRATED, TARGET, Explanation
from service.graph import TapGraph
from service.types import STRING

Arrays = dict[str, np.ndarray]



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
