"""Which TensorFlow ops a SavedModel would run, read from its saved_model.pb before
anything of it is loaded, and which of them the server does not allow.

A SavedModel is a program: its signatures can read files (ReadFile, CsvDataset), write
them (SaveV2, WriteFile, Dataset.cache) or list them. A deny-list of such ops missed new
ones, so the server allows only the ops of ordinary models (ALLOWED_OPS, collected from
Keras exports by scripts/saved_model_ops.py), in everything the loader or a request runs:
the signatures, the object graph's functions (resource initializers among them), the
init op, and the variables' restore (which may also read its checkpoint: RestoreV2).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tensorflow.core.framework import attr_value_pb2, function_pb2, graph_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from service.allowed_ops import ALLOWED_OPS

# Only the variables' restore may read a checkpoint (the model's own, the loader's path).
RESTORE_OPS = frozenset({"RestoreV2"})


def disallowed_ops(path: Path) -> list[str]:
    """The ops outside the allow-list that the SavedModel in folder `path` would run."""
    run, restore = used_ops(path)
    return sorted((run - ALLOWED_OPS) | (restore - ALLOWED_OPS - RESTORE_OPS))


def used_ops(path: Path) -> tuple[set[str], set[str]]:
    """The ops the SavedModel in folder `path` would run: loading and serving it, and
    restoring its variables."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((path / "saved_model.pb").read_bytes())
    run: set[str] = set()
    restore: set[str] = set()
    for meta in saved.meta_graphs:
        run |= _Walk(meta.graph_def).ops(_run_roots(meta))
        if meta.saver_def.restore_op_name:
            restore |= _Walk(meta.graph_def).ops(([meta.saver_def.restore_op_name], []))
    return run, restore


def _run_roots(meta: meta_graph_pb2.MetaGraphDef) -> tuple[list[str], list[str]]:
    """Graph nodes (signature outputs, the init op) and functions (the object graph's)
    that loading or serving the SavedModel may run."""
    nodes = [t.name for sig in meta.signature_def.values()
             for t in (*sig.outputs.values(), *sig.inputs.values())]
    graph = meta.object_graph_def
    functions = list(graph.concrete_functions)
    for node in graph.nodes:
        functions.extend(node.function.concrete_functions)
        if node.bare_concrete_function.concrete_function_name:
            functions.append(node.bare_concrete_function.concrete_function_name)
    return nodes, functions


class _Walk:
    """Collects the ops reachable from graph nodes and functions, calls followed."""

    def __init__(self, graph: graph_pb2.GraphDef) -> None:
        self._nodes = {n.name: n for n in graph.node}
        self._library = {f.signature.name: f for f in graph.library.function}
        self._seen_nodes: set[str] = set()
        self._seen_functions: set[str] = set()
        self._ops: set[str] = set()

    def ops(self, roots: tuple[Iterable[str], Iterable[str]]) -> set[str]:
        nodes, functions = roots
        stack = [_node_name(n) for n in nodes]
        while stack:  # the graph's nodes feeding the roots, by data and control edges
            name = stack.pop()
            if name in self._seen_nodes or name not in self._nodes:
                continue
            self._seen_nodes.add(name)
            node = self._nodes[name]
            self._op(node.op, node.attr.values())
            stack.extend(_node_name(i) for i in node.input)
        for name in functions:
            self._function(name)
        return self._ops

    def _op(self, op: str, attrs: Iterable[attr_value_pb2.AttrValue]) -> None:
        if op in self._library:  # a direct call of a library function
            self._function(op)
        else:
            self._ops.add(op)
        for attr in attrs:  # PartitionedCall's f, While's body, a dataset's map function...
            called = [attr.func] if attr.HasField("func") else list(attr.list.func)
            for func in called:
                self._function(func.name)
                self._op("NoOp", func.attr.values())  # functions passed to the function

    def _function(self, name: str) -> None:
        if name in self._seen_functions:
            return
        self._seen_functions.add(name)
        fn: function_pb2.FunctionDef | None = self._library.get(name)
        if fn is None:
            self._ops.add(name)  # not in the library: an op by that name, or nothing
            return
        for node in fn.node_def:  # every node of a called function may run
            self._op(node.op, node.attr.values())


def _node_name(tensor: str) -> str:
    """'^name' (a control input) or 'name:0' -> 'name'."""
    return tensor.lstrip("^").split(":")[0]
