"""Graph surgery: name every tap of a Keras functional model and cut it anywhere.

A model's graph is flattened across nested models (a Sequential or functional model
used as a layer) into one list of steps in topological order. A `Plan` is the pruned
slice of those steps that computes some taps from others; running it replays the
original layers on real tensors, so it builds no new Keras graph and never adds
nodes to the saved model's layers.

This relies on Keras internals that are unchanged from 3.0 to 3.15 (keras is pinned;
tests/test_graph.py pins them): `Functional._nodes_by_depth`, `Operation._inbound_nodes`,
`Node.operation / is_input / input_tensors / outputs / arguments.fill_in()`,
`Sequential._functional`, `Functional._inputs_struct / _outputs_struct`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
from keras import tree

from service.errors import NotFound
from service.validation import suggest

# A tensor in the flattened graph: the nested-model calls it sits inside (as node
# ids, outermost first) and the id of its KerasTensor.
Key = tuple[tuple[int, ...], int]


@dataclass(frozen=True)
class Tap:
    """A named tensor of the graph: a model input or output, or a layer's output."""

    name: str
    key: Key
    shape: tuple[int | None, ...]
    dtype: str
    layer: str  # the producing layer's class name ("InputLayer" for inputs)


@dataclass(frozen=True)
class Step:
    """One call of one operation, as recorded in the saved graph."""

    node: Any  # keras Node
    scope: tuple[int, ...]
    input_keys: tuple[Key, ...]
    output_keys: tuple[Key, ...]


def _functional_of(op: Any) -> Any | None:
    """The functional graph behind a model used as a layer, or None if it has none."""
    if isinstance(op, keras.Sequential):
        return getattr(op, "_functional", None)
    if isinstance(op, keras.Model) and hasattr(op, "_nodes_by_depth"):
        return op
    return None


def _dtype_name(dtype: Any) -> str:
    name = keras.backend.standardize_dtype(dtype)
    return "string" if name == "string" else name


class TapGraph:
    """A model's layer graph, flattened across nested models, with every tap named.

    Tap names (SPEC): the model's outputs by output name, its inputs by input name,
    `<layer>` (first call), `<layer>:<k>` (k-th call of a layer called more than once),
    `<outer>/<inner>` for layers inside nested models to any depth, and `<layer>#<i>`
    for the i-th output of an operation with several outputs.
    """

    def __init__(self, model: keras.Model) -> None:
        graph = _functional_of(model)
        if graph is None:
            raise TypeError(
                f"{type(model).__name__} {model.name!r} has no layer graph: only functional "
                "and Sequential models can be cut into endpoints and taps"
            )
        self.model = model
        self.steps: list[Step] = []
        self.taps: dict[str, Tap] = {}
        self._alias: dict[Key, Key] = {}
        self._producer: dict[Key, int] = {}  # key -> index of the step computing it
        self._flatten(graph, scope=(), prefix="")

        root_inputs = [((), id(t)) for t in graph.inputs]
        root_outputs = [((), id(t)) for t in graph.outputs]
        self.input_names = self._struct_names(graph._inputs_struct, graph.inputs)
        output_names = (
            self._struct_names(graph._outputs_struct, graph.outputs)
            if isinstance(graph._outputs_struct, dict) else list(graph.output_names)
        )
        # A model input or output name wins over a layer of the same name.
        for name, key, kt in zip(self.input_names, root_inputs, graph.inputs, strict=True):
            self.taps[name] = self._make_tap(name, key, kt, "InputLayer")
        self.output_names = output_names
        for name, key, kt in zip(output_names, root_outputs, graph.outputs, strict=True):
            layer = self.taps[name].layer if name in self.taps else type(
                kt._keras_history.operation).__name__
            self.taps[name] = self._make_tap(name, self._resolve(key), kt, layer)

    @staticmethod
    def _struct_names(struct: Any, tensors: Sequence[Any]) -> list[str]:
        if isinstance(struct, dict):  # flattened in sorted-key order, as model.outputs is
            return [str(path[0]) for path, _ in tree.flatten_with_path(struct)]
        # The InputLayer's name: a fresh Sequential's input tensor is "keras_tensor_<n>".
        return [t._keras_history.operation.name for t in tensors]

    def _resolve(self, key: Key) -> Key:
        while key in self._alias:
            key = self._alias[key]
        return key

    def _make_tap(self, name: str, key: Key, kt: Any, layer: str) -> Tap:
        # The first dimension is the batch, whatever size the graph was built with (a
        # Sequential built by an eager call keeps that call's batch size): any goes.
        shape = (None, *kt.shape[1:]) if kt.shape else ()
        return Tap(name, key, shape, _dtype_name(kt.dtype), layer)

    def _flatten(self, graph: Any, scope: tuple[int, ...], prefix: str) -> None:
        """Append `graph`'s steps (recursing into nested models) and name its taps."""
        nodes = [n for d in sorted(graph._nodes_by_depth, reverse=True)
                 for n in graph._nodes_by_depth[d]]
        in_graph = {id(n) for n in nodes}
        for node in nodes:
            op = node.operation
            calls = [n for n in op._inbound_nodes if id(n) in in_graph]
            k = next(i for i, n in enumerate(calls) if n is node)
            # The first call is `<layer>`; `<layer>:0` names it too when there are more.
            name = prefix + op.name + (f":{k}" if k else "")
            also = f"{name}:0" if k == 0 and len(calls) > 1 else None

            if node.is_input:
                keys = [(scope, id(t)) for t in node.outputs]
            else:
                inner = _functional_of(op)
                input_keys = tuple(self._resolve((scope, id(t))) for t in node.input_tensors)
                if inner is not None:
                    keys = self._flatten_nested(node, inner, scope, name + "/")
                else:
                    keys = [(scope, id(t)) for t in node.outputs]
                    for key in keys:
                        self._producer[key] = len(self.steps)
                    self.steps.append(Step(node, scope, input_keys, tuple(keys)))

            layer = type(op).__name__
            for i, (key, kt) in enumerate(zip(keys, node.outputs, strict=True)):
                suffix = f"#{i}" if len(keys) > 1 else ""
                self.taps[name + suffix] = self._make_tap(
                    name + suffix, self._resolve(key), kt, layer)
            if also:
                for tap in [t for t in self.taps.values()
                            if t.name.startswith((name + "/", name + "#")) or t.name == name]:
                    alias = also + tap.name[len(name):]
                    self.taps[alias] = Tap(alias, tap.key, tap.shape, tap.dtype, tap.layer)

    def _flatten_nested(self, node: Any, inner: Any, scope: tuple[int, ...],
                        prefix: str) -> list[Key]:
        """Inline a nested model's call: its inputs alias the call's arguments."""
        inner_scope = scope + (id(node),)
        arg = node.arguments.args[0] if node.arguments.args else None
        if isinstance(arg, dict) and isinstance(inner._inputs_struct, dict):
            outer = [arg[name] for name in inner._inputs_struct]
            inner_in = [inner._inputs_struct[name] for name in inner._inputs_struct]
        else:
            outer, inner_in = tree.flatten(arg), list(inner.inputs)
        for o, i in zip(outer, inner_in, strict=True):
            self._alias[(inner_scope, id(i))] = self._resolve((scope, id(o)))
        self._flatten(inner, inner_scope, prefix)
        outer_keys = [(scope, id(t)) for t in node.outputs]
        for o, i in zip(outer_keys, inner.outputs, strict=True):
            self._alias[o] = self._resolve((inner_scope, id(i)))
        return outer_keys

    def tap(self, name: str) -> Tap:
        try:
            return self.taps[name]
        except KeyError:
            raise NotFound(
                f"the model has no tap {name!r}; {suggest(name, self.taps)}"
            ) from None

    def computable(self, inputs: Sequence[str]) -> set[str]:
        """Names of every tap that can be computed from `inputs` alone."""
        known = {self.tap(n).key for n in inputs}
        for step in self.steps:
            if all(k in known for k in step.input_keys):
                known.update(step.output_keys)
        return {name for name, tap in self.taps.items() if tap.key in known}

    def plan(self, inputs: Sequence[str], outputs: Sequence[str]) -> Plan:
        """The pruned steps that compute `outputs` from `inputs` (both tap names)."""
        in_keys = {self.tap(n).key: n for n in inputs}
        out_taps = [self.tap(n) for n in outputs]
        needed: set[int] = set()
        # Which outputs each key feeds: lets a shared pass run a head on its rows only.
        feeds: dict[Key, set[str]] = {}
        stack = [(t.key, t.name) for t in out_taps]
        while stack:
            key, out = stack.pop()
            if out in feeds.setdefault(key, set()):
                continue
            feeds[key].add(out)
            if key in in_keys:
                continue
            if key not in self._producer:
                missing = next((t.name for t in self.taps.values() if t.key == key), "?")
                raise NotFound(
                    f"output {out!r} cannot be computed from inputs {list(inputs)}: it depends on "
                    f"{missing!r}, which is not among them"
                )
            index = self._producer[key]
            needed.add(index)
            stack.extend((k, out) for k in self.steps[index].input_keys)
        steps = [self.steps[i] for i in sorted(needed)]
        return Plan(tuple(inputs), tuple(outputs), steps, in_keys,
                    {t.name: t.key for t in out_taps},
                    {k: frozenset(v) for k, v in feeds.items()})


def _call(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Serving is inference: layers that take `training` (Dropout, BatchNorm) get False.
    if "training" in getattr(op, "_call_context_args", ()):
        kwargs = {**kwargs, "training": False}
    return op(*args, **kwargs)


@dataclass
class Plan:
    """Computes `outputs` from `inputs` by replaying only the steps between them."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: list[Step]
    input_keys: dict[Key, str]
    output_keys: dict[str, Key]
    feeds: dict[Key, frozenset[str]]  # which outputs each tensor contributes to

    def __call__(self, values: Mapping[str, Any],
                 rows: Mapping[str, Any] | None = None,
                 gather: Callable[[Any, Any], Any] | None = None) -> dict[str, Any]:
        """Run on backend tensors keyed by input name; returns tensors by output name.

        Shared passes: with `rows` (a boolean row mask per output) and `gather`
        (`gather(x, mask)` keeps the rows of x where mask is true), every step runs
        only on the rows of the outputs it feeds, so a head nobody asked for on a row
        is not computed for it. Each output then holds just its own rows, in order.
        """
        every = frozenset(self.outputs)
        env = {key: values[name] for key, name in self.input_keys.items()}
        held = dict.fromkeys(env, every)  # the outputs whose rows each value holds
        masks: dict[frozenset[str], Any] = {}

        def mask(rows: Mapping[str, Any], outs: frozenset[str]) -> Any:
            if outs not in masks:
                masks[outs] = keras.ops.any(keras.ops.stack([rows[o] for o in outs]), axis=0)
            return masks[outs]

        def narrow(key: Key, want: frozenset[str]) -> Any:
            have = held[key]
            if rows is None or have == want:
                return env[key]
            if gather is None:
                raise TypeError("Plan: `rows` needs `gather`")
            if have == every:  # every row asked for some output: all rows are here
                return gather(env[key], mask(rows, want))
            return gather(env[key], gather(mask(rows, want), mask(rows, have)))

        for step in self.steps:
            want = frozenset().union(*(self.feeds[k] for k in step.output_keys))
            local = {id(t): narrow(k, want)
                     for t, k in zip(step.node.input_tensors, step.input_keys, strict=True)}
            args, kwargs = step.node.arguments.fill_in(local)
            results = tree.flatten(_call(step.node.operation, args, kwargs))
            env.update(zip(step.output_keys, results, strict=True))
            held.update(dict.fromkeys(step.output_keys, want))
        return {name: narrow(key, frozenset({name})) for name, key in self.output_keys.items()}
