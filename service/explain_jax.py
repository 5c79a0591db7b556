"""Explanations on JAX: gradients by jax.grad over the model's plan, replayed under
`keras.StatelessScope` with the weights as arguments (as service/runtime_jax.py runs cuts).
The same numbers as service/explain_tf.py, to float tolerance. Imported only on jax.

Each explain endpoint compiles one executable per padded batch size (the runtime's ladder)
and device; integrated gradients runs its steps in chunks of a fixed size per batch size
(padded with zero-weight steps), so its shapes are static too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import keras
import numpy as np

from service.errors import ConfigError
from service.explain import ATTRIBUTION, GRADCAM, GRADIENT, INTEGRATED, TARGET, Explanation
from service.graph import TapGraph

_FLOATS = ("float16", "bfloat16", "float32", "float64")
# JAX runs 64-bit types as 32-bit (jax_enable_x64 off, as Keras leaves it): feeds are cast
# here, once, rather than by JAX with a warning per call.
_X32 = {"int64": np.int32, "uint64": np.uint32, "float64": np.float32}


def abstract(shape: tuple[int, ...], dtype: Any, device: jax.Device) -> Any:
    """A placeholder argument of this shape on `device`, to compile for."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # type: ignore[no-untyped-call]


def x32(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds with 64-bit arrays as the 32-bit ones JAX computes on."""
    return {n: a.astype(_X32[a.dtype.name]) if a.dtype.name in _X32 else a
            for n, a in feeds.items()}


def stateless(variables: list[Any], values: list[jax.Array], plan: Any,
              feeds: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Run `plan` with the model's `variables` reading `values`: the weights as arguments
    of the compiled function, never constants baked into it."""
    with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
        return cast(dict[str, jax.Array], plan(feeds))


def shapes(feeds: Mapping[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """Each feed's name, row shape and dtype: what an executable is compiled for, beside
    the batch size."""
    return tuple((n, tuple(a.shape[1:]), a.dtype.str) for n, a in sorted(feeds.items()))


def _pick(scores: jax.Array, target: jax.Array) -> jax.Array:
    """Each row's score of its target class (its argmax where the target is NO_TARGET)."""
    best = jnp.argmax(scores, axis=-1)
    index = jnp.where(target < 0, best, target)
    return jnp.take_along_axis(scores, index[:, None].astype(best.dtype), axis=1)[:, 0]


def differentiable(graph: TapGraph, inputs: tuple[str, ...], wrt: str, output: str) -> bool:
    """Whether `output` has a gradient with respect to `wrt`: a path between them through
    floating tensors only (an argmax or a cast to integers cuts it). TensorFlow finds this
    while tracing (its gradient is None); JAX answers zeros, so the graph is read instead."""
    plan = graph.plan(tuple(dict.fromkeys((*inputs, wrt))), [output])
    live = {graph.tap(wrt).key}
    for step in plan.steps:
        if any(k in live for k in step.input_keys):
            for key, tensor in zip(step.output_keys, step.node.outputs, strict=True):
                if keras.backend.standardize_dtype(tensor.dtype) in _FLOATS:
                    live.add(key)
    return graph.tap(output).key in live


class JaxExplainer:
    """One explain endpoint's pure function, compiled per (padded rows, device)."""

    def __init__(self, graph: TapGraph, explanation: Explanation, variables: list[Any],
                 max_rows: int, on_compile: Callable[[], None]) -> None:
        self.explanation = e = explanation
        self.output = ATTRIBUTION
        self.max_rows = max(1, max_rows)
        self._on_compile = on_compile
        self._compiled: dict[tuple[int, str, tuple[tuple[str, tuple[int, ...], str], ...]],
                             Any] = {}
        self._lock = threading.Lock()
        wrt = str(e.layer if e.kind == GRADCAM else e.input)
        if not differentiable(graph, e.inputs, wrt, e.output):
            raise ConfigError(f"endpoint {e.endpoint!r}: output {e.output!r} has no gradient "
                              f"with respect to {wrt!r} (the path between them is not "
                              "differentiable, e.g. an argmax or a cast to integers)")
        forward = graph.plan(e.inputs, [e.output])

        def scoped(values: list[jax.Array], plan: Any, feeds: Mapping[str, jax.Array]
                   ) -> dict[str, jax.Array]:
            return stateless(variables, values, plan, feeds)

        def model_feeds(feeds: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
            return {n: v for n, v in feeds.items() if n != TARGET}

        self._fn: Callable[..., jax.Array]
        if e.kind == GRADIENT:
            def gradient(values: list[jax.Array], feeds: dict[str, jax.Array]) -> jax.Array:
                def score(x: jax.Array) -> jax.Array:
                    out = scoped(values, forward, {**model_feeds(feeds), wrt: x})[e.output]
                    return jnp.sum(_pick(out, feeds[TARGET]))

                return cast(jax.Array, jax.grad(score)(feeds[wrt])).astype(jnp.float32)

            self._fn = gradient
        elif e.kind == GRADCAM:
            front = graph.plan(e.inputs, [wrt])
            back = graph.plan((*e.inputs, wrt), [e.output])

            def gradcam(values: list[jax.Array], feeds: dict[str, jax.Array]) -> jax.Array:
                base = model_feeds(feeds)
                a = scoped(values, front, base)[wrt]

                def score(a: jax.Array) -> jax.Array:
                    out = scoped(values, back, {**base, wrt: a})[e.output]
                    return jnp.sum(_pick(out, feeds[TARGET]))

                g = jax.grad(score)(a)
                # Each channel weighted by its mean gradient over the spatial axes.
                weights = jnp.mean(g, axis=tuple(range(1, a.ndim - 1)), keepdims=True)
                return jax.nn.relu(jnp.sum(weights * a, axis=-1)).astype(jnp.float32)

            self._fn = gradcam
        else:
            def integrated(values: list[jax.Array], feeds: dict[str, jax.Array],
                           alphas: jax.Array, weights: jax.Array) -> jax.Array:
                """The sum of the gradients at alpha * input for each alpha, per row
                (weighted: a padding alpha weighs 0)."""
                base = model_feeds(feeds)
                x = feeds[wrt]
                k = alphas.shape[0]
                # The target resolves on the input itself, not on its scaled copies.
                best = jnp.argmax(scoped(values, forward, base)[e.output], axis=-1)
                target = jnp.where(feeds[TARGET] < 0, best, feeds[TARGET].astype(best.dtype))
                target = jnp.repeat(target, k)
                scale = alphas.astype(x.dtype).reshape((1, k) + (1,) * (x.ndim - 1))
                # Row r's copies are rows r*k .. r*k + k - 1.
                scaled = (x[:, None] * scale).reshape((-1, *x.shape[1:]))
                others = {n: jnp.repeat(v, k, axis=0) for n, v in base.items() if n != wrt}

                def score(s: jax.Array) -> jax.Array:
                    out = scoped(values, forward, {**others, wrt: s})[e.output]
                    return jnp.sum(jnp.take_along_axis(out, target[:, None], axis=1))

                g = jax.grad(score)(scaled).astype(jnp.float32)
                g = g.reshape((-1, k, *x.shape[1:]))
                w = weights.reshape((1, k) + (1,) * (x.ndim - 1))
                return jnp.sum(g * w, axis=1)

            self._fn = integrated

    def _chunk(self, rows: int) -> int:
        """Steps computed at once for a batch of `rows`: at most max_rows scaled rows."""
        return min(self.explanation.steps, max(1, self.max_rows // rows))

    @staticmethod
    def _key(feeds: Mapping[str, np.ndarray], rows: int, device: str) -> Any:
        return rows, device, shapes(feeds)

    def compiled(self, feeds: Mapping[str, np.ndarray], rows: int, device: str) -> bool:
        """Whether these feeds' shapes on `device` are compiled already."""
        with self._lock:
            return self._key(x32(feeds), rows, device) in self._compiled

    def compile(self, feeds: Mapping[str, np.ndarray], rows: int, device: str,
                dev: jax.Device, values: list[jax.Array]) -> Any:
        """The executable for these feeds' shapes on `device`, compiled once and kept."""
        key = self._key(feeds, rows, device)
        with self._lock:
            fn = self._compiled.get(key)
        if fn is not None:
            return fn
        args: list[Any] = [values, {n: abstract(a.shape, a.dtype, dev)
                                    for n, a in feeds.items()}]
        if self.explanation.kind == INTEGRATED:
            args += [abstract((self._chunk(rows),), jnp.float32, dev)] * 2
        fn = jax.jit(self._fn).lower(*args).compile()  # off the lock: sizes compile at once
        with self._lock:
            fn = self._compiled.setdefault(key, fn)
        self._on_compile()
        return fn

    def __call__(self, feeds: Mapping[str, np.ndarray], rows: int, device: str,
                 values: list[jax.Array], dev: jax.Device) -> np.ndarray:
        e = self.explanation
        feeds = x32(feeds)
        fn = self.compile(feeds, rows, device, dev, values)
        placed = {n: jax.device_put(v, dev) for n, v in feeds.items()}
        if e.kind != INTEGRATED:
            return np.asarray(fn(values, placed))
        alphas = np.arange(1, e.steps + 1, dtype=np.float32) / e.steps  # right Riemann sum
        k = self._chunk(rows)
        total = np.zeros(feeds[str(e.input)].shape, dtype=np.float32)
        for i in range(0, e.steps, k):
            chunk = alphas[i:i + k]
            weights = np.zeros(k, dtype=np.float32)
            weights[:len(chunk)] = 1.0
            chunk = np.concatenate([chunk, np.ones(k - len(chunk), dtype=np.float32)])
            total += np.asarray(fn(values, placed, jax.device_put(chunk, dev),
                                   jax.device_put(weights, dev)))
        x = np.asarray(feeds[str(e.input)], dtype=np.float32)
        return x * (total / e.steps)  # baseline 0: (input - baseline) * mean gradient
