"""Graph surgery (service/graph.py) against plain Keras: taps, cuts, pruning, shared passes.

Every value a plan computes is compared with what Keras itself gives: a
`keras.Model(model.inputs, layer.output)` where Keras can build one (a top-level layer's
first call), else a manual recomputation calling the layers in sequence (nested models,
the k-th call of a shared layer). Plans run both eagerly and compiled: inside a
`tf.function`, or `jax.jit` on jax (TAPSERVE_BACKEND).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zoo  # noqa: E402
from backend import JAX  # noqa: E402

from service.errors import NotFound  # noqa: E402
from service.graph import Plan, TapGraph  # noqa: E402

if JAX:
    import jax
else:
    import tensorflow as tf

L = keras.layers
MODES = ["eager", "function"]
# JAX has no string tensors: string_input is TensorFlow's alone.
ZOO = sorted(n for n in zoo.ZOO if not (JAX and n == "string_input"))
GRAPH_MODELS = [n for n in ZOO if n != "lambda_layer"]
_const = keras.ops.convert_to_tensor if JAX else tf.constant

Arrays = dict[str, np.ndarray]


# --- helpers -----------------------------------------------------------------------------

def _tensors(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _const(v) for k, v in values.items()}


def _numpy(values: Mapping[str, Any]) -> Arrays:
    return {k: v.numpy() if not JAX and isinstance(v, tf.Tensor) and v.dtype == tf.string
            else np.asarray(v) for k, v in values.items()}


def _signature(tensors: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tf.TensorSpec((None, *t.shape[1:]), t.dtype) for k, t in tensors.items()}


def run_plan(plan: Plan, feeds: Mapping[str, Any], mode: str) -> Arrays:
    """Run `plan` eagerly, or compiled: in a tf.function whose input signature has a None
    batch, or jax.jit (which compiles for the feeds' shapes)."""
    tensors = _tensors(feeds)
    if mode == "eager":
        return _numpy(plan(tensors))
    if JAX:
        return _numpy(jax.jit(lambda f: plan(f))(tensors))
    fn = tf.function(lambda f: plan(f), input_signature=[_signature(tensors)])
    return _numpy(fn(tensors))


def assert_same(got: Any, want: Any, what: str = "") -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype == object or want.dtype == object or got.dtype.kind in "SU":
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=what)


def assert_all_same(got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert_same(got[name], want[name], name)


def functional(model: keras.Model) -> keras.Model:
    return model._functional if isinstance(model, keras.Sequential) else model


def model_args(model: keras.Model, feeds: Arrays) -> Any:
    tensors = [_const(feeds[n]) for n in zoo.input_names(model)]
    return tensors[0] if len(tensors) == 1 else tensors


def model_outputs(model: keras.Model, feeds: Arrays) -> Arrays:
    """model(x) keyed by output name: dict keys, else the output layers' names."""
    result = model(model_args(model, feeds))
    if isinstance(result, dict):
        return _numpy(result)
    names = [t._keras_history.operation.name for t in functional(model).outputs]
    flat = result if isinstance(result, list | tuple) else [result]
    return _numpy(dict(zip(names, flat, strict=True)))


def _manual_siamese(model: keras.Model, feeds: Arrays, ref: Arrays) -> Arrays:
    shared = model.get_layer("shared")
    return {"shared:0": ref["shared"], "shared:1": np.asarray(shared(feeds["right"]))}


def _manual_nested(model: keras.Model, feeds: Arrays, ref: Arrays) -> Arrays:
    backbone = model.get_layer("backbone")
    block = backbone.get_layer("block")
    stem = _const(ref["stem"])
    b1 = backbone.get_layer("b1")(stem)
    b2 = backbone.get_layer("b2")(b1)
    inner = block.get_layer("inner")(b2)
    proj = block.get_layer("inner_proj")(inner)
    out = backbone(stem)
    np.testing.assert_allclose(np.asarray(proj), np.asarray(out), atol=1e-5)
    return {"backbone/backbone_in": ref["stem"], "backbone/b1": np.asarray(b1),
            "backbone/b2": np.asarray(b2), "backbone/block/block_in": np.asarray(b2),
            "backbone/block/inner": np.asarray(inner),
            "backbone/block/inner_proj": np.asarray(proj),
            "backbone/block": np.asarray(block(b2)), "backbone": np.asarray(out)}


# Taps Keras cannot build a model for: nested layers and k-th calls, recomputed by hand.
MANUAL: dict[str, Callable[[keras.Model, Arrays, Arrays], Arrays]] = {
    "siamese": _manual_siamese,
    "nested": _manual_nested,
}


def reference_taps(name: str, model: keras.Model, feeds: Arrays) -> Arrays:
    """Every tap's value as plain Keras computes it."""
    graph = functional(model)
    ref: Arrays = dict(feeds)
    ref.update(model_outputs(model, feeds))
    for op in graph.operations:
        if isinstance(op, keras.layers.InputLayer | keras.Model):
            continue  # inputs are the feeds; nested models are recomputed by hand
        sub = keras.Model(graph.inputs, op.output)  # a top-level op's first call
        ref[op.name] = np.asarray(sub(model_args(model, feeds)))
    if name in MANUAL:
        ref.update(MANUAL[name](model, feeds, ref))
    return ref


def all_taps(model: keras.Model, feeds: Arrays, mode: str) -> tuple[TapGraph, Arrays]:
    graph = TapGraph(model)
    plan = graph.plan(graph.input_names, sorted(graph.taps))
    return graph, run_plan(plan, feeds, mode)


@pytest.fixture(scope="module")
def models() -> dict[str, keras.Model]:
    return {name: zoo.ZOO[name]() for name in ZOO}


# --- every zoo model ---------------------------------------------------------------------

@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_input_and_output_names_match_the_model(name: str, models: dict) -> None:
    model = models[name]
    graph = TapGraph(model)
    assert graph.input_names == zoo.input_names(model)
    assert sorted(graph.output_names) == sorted(model_outputs(model, zoo.sample_inputs(model)))
    for n in graph.input_names:
        assert graph.tap(n).layer == "InputLayer"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_full_plan_equals_the_model(name: str, mode: str, models: dict) -> None:
    model = models[name]
    graph = TapGraph(model)
    feeds = zoo.sample_inputs(model, batch=5)
    got = run_plan(graph.plan(graph.input_names, graph.output_names), feeds, mode)
    assert_all_same(got, model_outputs(model, feeds))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", GRAPH_MODELS)
def test_every_tap_equals_keras(name: str, mode: str, models: dict) -> None:
    model = models[name]
    feeds = zoo.sample_inputs(model, batch=4)
    graph, got = all_taps(model, feeds, mode)
    want = reference_taps(name, model, feeds)
    assert set(graph.taps) == set(want), "a tap with no reference, or a reference with no tap"
    assert_all_same(got, want)
    for tap_name, tap in graph.taps.items():  # declared shape and dtype match the values
        assert got[tap_name].shape[1:] == tuple(tap.shape[1:]), tap_name


def test_lambda_layer_taps_work_too(models: dict) -> None:
    model = models["lambda_layer"]
    feeds = zoo.sample_inputs(model)
    _, got = all_taps(model, feeds, "function")
    assert_all_same(got, reference_taps("lambda_layer", model, feeds))


# --- cuts --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_autoencoder_decoder_cut(mode: str, models: dict) -> None:
    model = models["autoencoder"]
    image = _const(zoo.sample_inputs(model, batch=3)["image"])
    code = keras.Model(model.inputs, model.get_layer("code").output)(image)
    h = code
    for layer in ["dec_dense", "dec_pixels", "dec_reshape", "recon"]:
        h = model.get_layer(layer)(h)
    got = run_plan(TapGraph(model).plan(["code"], ["recon"]), {"code": np.asarray(code)}, mode)
    assert_same(got["recon"], h)
    assert_same(got["recon"], model(image))  # the same code gives the same reconstruction


@pytest.mark.parametrize("mode", MODES)
def test_nested_from_b1_cut(mode: str, models: dict) -> None:
    model = models["nested"]
    x = _const(zoo.sample_inputs(model, batch=3)["x"])
    backbone = model.get_layer("backbone")
    b1 = backbone.get_layer("b1")(model.get_layer("stem")(x))
    want = model.get_layer("logits")(
        backbone.get_layer("block")(backbone.get_layer("b2")(b1)))
    plan = TapGraph(model).plan(["backbone/b1"], ["logits"])
    got = run_plan(plan, {"backbone/b1": np.asarray(b1)}, mode)
    assert_same(got["logits"], want)
    assert_same(got["logits"], model(x))
    assert {s.node.operation.name for s in plan.steps} == {"b2", "inner", "inner_proj", "logits"}


@pytest.mark.parametrize("mode", MODES)
def test_two_heads_head_cut(mode: str, models: dict) -> None:
    model = models["two_heads"]
    x = _const(zoo.sample_inputs(model, batch=3)["x"])
    merged = keras.Model(model.inputs, model.get_layer("merged").output)(x)
    got = run_plan(TapGraph(model).plan(["merged"], ["label"]), {"merged": np.asarray(merged)},
                   mode)
    assert_same(got["label"], model(x)["label"])


def test_cut_with_a_fresh_input_of_the_taps_shape(models: dict) -> None:
    """A cut input need not come from the model: any tensor of the tap's shape will do."""
    model = models["autoencoder"]
    code = np.random.default_rng(3).random((2, 4), dtype=np.float32)
    got = run_plan(TapGraph(model).plan(["code"], ["recon"]), {"code": code}, "eager")
    h = _const(code)
    for layer in ["dec_dense", "dec_pixels", "dec_reshape", "recon"]:
        h = model.get_layer(layer)(h)
    assert_same(got["recon"], h)


# --- pruning -----------------------------------------------------------------------------

def _step_names(plan: Plan) -> set[str]:
    return {step.node.operation.name for step in plan.steps}


def test_plan_for_one_branch_has_no_step_of_the_other(models: dict) -> None:
    plan = TapGraph(models["two_heads"]).plan(["x"], ["branch_a"])
    assert _step_names(plan) == {"a_hidden", "branch_a"}


def test_decoder_plan_has_no_encoder_steps(models: dict) -> None:
    plan = TapGraph(models["autoencoder"]).plan(["code"], ["recon"])
    assert _step_names(plan) == {"dec_dense", "dec_pixels", "dec_reshape", "recon"}


def test_encoder_plan_has_no_decoder_steps(models: dict) -> None:
    plan = TapGraph(models["autoencoder"]).plan(["image"], ["code"])
    assert _step_names(plan) == {"enc_conv", "enc_flat", "enc_dense", "code"}


def test_plan_for_one_siamese_side_uses_only_its_input(models: dict) -> None:
    graph = TapGraph(models["siamese"])
    plan = graph.plan(["right"], ["shared:1"])
    assert len(plan.steps) == 1 and _step_names(plan) == {"shared"}
    feeds = zoo.sample_inputs(models["siamese"])
    got = run_plan(plan, {"right": feeds["right"]}, "function")
    assert_same(got["shared:1"], models["siamese"].get_layer("shared")(feeds["right"]))


# --- tap names ---------------------------------------------------------------------------

def test_shared_layer_call_names(models: dict) -> None:
    graph = TapGraph(models["siamese"])
    assert {"shared", "shared:0", "shared:1"} <= set(graph.taps)
    assert graph.tap("shared").key == graph.tap("shared:0").key
    assert graph.tap("shared:0").key != graph.tap("shared:1").key
    assert "diff:0" not in graph.taps  # only layers called more than once get ":k"


def test_nested_tap_names_reach_depth_two(models: dict) -> None:
    graph = TapGraph(models["nested"])
    assert {"backbone", "backbone/b1", "backbone/b2", "backbone/block",
            "backbone/block/inner", "backbone/block/inner_proj"} <= set(graph.taps)
    assert graph.tap("backbone/block/inner").layer == "Dense"
    # `<outer>` alone is the nested model's output.
    assert graph.tap("backbone").key == graph.tap("backbone/block").key
    assert graph.tap("backbone/block").key == graph.tap("backbone/block/inner_proj").key


def _twice_nested_model() -> keras.Model:
    keras.utils.set_random_seed(7)
    sub_in = keras.Input(shape=(4,), name="sub_in")
    sub = keras.Model(sub_in, L.Dense(3, name="d")(L.Dense(5, name="c")(sub_in)), name="sub")
    p, q = keras.Input(shape=(4,), name="p"), keras.Input(shape=(4,), name="q")
    return keras.Model([p, q], L.Add(name="add")([sub(p), sub(q)]), name="twice")


@pytest.mark.parametrize("mode", MODES)
def test_nested_model_called_twice_gets_k_th_call_taps(mode: str) -> None:
    model = _twice_nested_model()
    graph = TapGraph(model)
    assert {"sub", "sub:0", "sub:1", "sub/c", "sub:0/c", "sub:1/c", "sub:1/d"} <= set(graph.taps)
    rng = np.random.default_rng(1)
    feeds = {n: rng.random((3, 4), dtype=np.float32) for n in ("p", "q")}
    names = ["sub", "sub:0", "sub:1", "sub/c", "sub:0/c", "sub:1/c", "sub:0/d", "sub:1/d", "add"]
    got = run_plan(graph.plan(["p", "q"], names), feeds, mode)
    sub = model.get_layer("sub")
    c = sub.get_layer("c")
    want = {"sub": sub(feeds["p"]), "sub:0": sub(feeds["p"]), "sub:1": sub(feeds["q"]),
            "sub/c": c(feeds["p"]), "sub:0/c": c(feeds["p"]), "sub:1/c": c(feeds["q"]),
            "sub:0/d": sub(feeds["p"]), "sub:1/d": sub(feeds["q"]),
            "add": model([feeds["p"], feeds["q"]])}
    assert_all_same(got, {k: np.asarray(v) for k, v in want.items()})
    # The second call only needs the second input.
    assert_same(run_plan(graph.plan(["q"], ["sub:1/c"]), {"q": feeds["q"]}, mode)["sub:1/c"],
                c(feeds["q"]))


class _Halves(L.Layer):
    """A layer with two outputs: the first two and the last two features."""

    def call(self, t: Any) -> tuple[Any, Any]:
        return t[:, :2], t[:, 2:]


@pytest.mark.parametrize("mode", MODES)
def test_multi_output_op_gets_hash_index_taps(mode: str) -> None:
    y = keras.Input(shape=(4,), name="y")
    u, v = _Halves(name="halves")(y)
    model = keras.Model(y, [L.Dense(1, name="du")(u), L.Dense(1, name="dv")(v)])
    graph = TapGraph(model)
    assert {"halves#0", "halves#1"} <= set(graph.taps)
    feeds = {"y": np.arange(12, dtype=np.float32).reshape(3, 4)}
    got = run_plan(graph.plan(["y"], ["halves#0", "halves#1", "dv"]), feeds, mode)
    assert_same(got["halves#0"], feeds["y"][:, :2])
    assert_same(got["halves#1"], feeds["y"][:, 2:])
    assert_same(got["dv"], model.get_layer("dv")(feeds["y"][:, 2:]))
    # A cut at the second output needs nothing of the first.
    plan = graph.plan(["halves#1"], ["dv"])
    assert _step_names(plan) == {"dv"}


@pytest.mark.parametrize("mode", MODES)
def test_dict_output_names_are_the_keys(mode: str, models: dict) -> None:
    model = models["two_heads"]
    graph = TapGraph(model)
    assert sorted(graph.output_names) == ["label", "score"]
    assert graph.tap("label").key == graph.tap("label_head").key
    assert graph.tap("score").key == graph.tap("score_head").key
    feeds = zoo.sample_inputs(model)
    got = run_plan(graph.plan(["x"], ["score", "label"]), feeds, mode)
    want = model(feeds["x"])
    assert_same(got["label"], want["label"])
    assert_same(got["score"], want["score"])


@pytest.mark.parametrize("mode", MODES)
def test_dict_outputs_in_unsorted_key_order_map_to_the_right_tensors(mode: str) -> None:
    """Regression: Keras flattens dict outputs in sorted key order, not insertion order."""
    keras.utils.set_random_seed(5)
    x = keras.Input(shape=(4,), name="x")
    zeta = L.Dense(2, name="zeta_head")(x)
    alpha = L.Dense(3, name="alpha_head")(x)
    model = keras.Model(x, {"zeta": zeta, "alpha": alpha})
    graph = TapGraph(model)
    assert sorted(graph.output_names) == ["alpha", "zeta"]
    assert graph.tap("zeta").shape == (None, 2)
    assert graph.tap("alpha").shape == (None, 3)
    assert graph.tap("zeta").key == graph.tap("zeta_head").key
    feeds = {"x": np.random.default_rng(2).random((3, 4), dtype=np.float32)}
    got = run_plan(graph.plan(["x"], graph.output_names), feeds, mode)
    want = model(feeds["x"])
    assert_same(got["zeta"], want["zeta"])
    assert_same(got["alpha"], want["alpha"])


@pytest.mark.filterwarnings("ignore:When providing `inputs` as a dict")  # keys != names
@pytest.mark.parametrize("mode", MODES)
def test_dict_inputs_in_unsorted_key_order_map_to_the_right_tensors(mode: str) -> None:
    zeta, alpha = keras.Input(shape=(2,), name="zin"), keras.Input(shape=(3,), name="ain")
    model = keras.Model({"zeta": zeta, "alpha": alpha}, L.Concatenate(name="c")([zeta, alpha]))
    graph = TapGraph(model)
    assert sorted(graph.input_names) == ["alpha", "zeta"]
    assert graph.tap("zeta").shape == (None, 2) and graph.tap("alpha").shape == (None, 3)
    feeds = {"zeta": np.ones((2, 2), np.float32), "alpha": np.zeros((2, 3), np.float32)}
    got = run_plan(graph.plan(["zeta", "alpha"], ["c"]), feeds, mode)
    assert_same(got["c"], model(feeds))


def test_sequential_input_is_named_after_its_input_layer(models: dict) -> None:
    """Regression: a fresh Sequential's input tensor is named "keras_tensor_<n>"; the tap
    and input name must be the InputLayer's (what the saved file and clients see)."""
    model = models["sequential"]
    graph = TapGraph(model)
    name = model._functional.inputs[0]._keras_history.operation.name
    assert graph.input_names == [name]
    assert not any(t.startswith("keras_tensor") for t in graph.taps)


def test_sequential_output_names() -> None:
    """Regression: Sequential has no `output_names`; TapGraph used to crash on it."""
    graph = TapGraph(zoo.build_sequential())
    assert graph.output_names == ["out"]


@pytest.mark.parametrize("mode", MODES)
def test_dropout_and_batch_norm_replay_in_inference_mode(mode: str) -> None:
    keras.utils.set_random_seed(9)
    x = keras.Input(shape=(4,), name="x")
    h = L.Dropout(0.9, name="drop")(L.Dense(8, name="d")(x))
    h = L.BatchNormalization(name="bn")(h)
    model = keras.Model(x, L.Dense(2, name="o")(h))
    feeds = {"x": np.random.default_rng(4).random((5, 4), dtype=np.float32)}
    got = run_plan(TapGraph(model).plan(["x"], ["o", "drop"]), feeds, mode)
    assert_same(got["o"], model(feeds["x"], training=False))
    assert_same(got["drop"], model.get_layer("d")(feeds["x"]))  # dropout is the identity


# --- errors ------------------------------------------------------------------------------

def test_unknown_tap_is_not_found_with_suggestions(models: dict) -> None:
    graph = TapGraph(models["two_heads"])
    with pytest.raises(NotFound, match="branch_a"):
        graph.tap("brnch_a")
    with pytest.raises(NotFound, match="brnch_a"):
        graph.plan(["x"], ["brnch_a"])
    with pytest.raises(NotFound, match="nope"):
        graph.plan(["nope"], ["label"])


def test_output_not_computable_names_the_missing_input(models: dict) -> None:
    with pytest.raises(NotFound, match="'right'"):
        TapGraph(models["siamese"]).plan(["left"], ["similarity"])
    with pytest.raises(NotFound, match="'image'"):
        TapGraph(models["autoencoder"]).plan(["code"], ["enc_dense"])


def test_computable_lists_what_a_cut_reaches(models: dict) -> None:
    graph = TapGraph(models["autoencoder"])
    assert graph.computable(["code"]) == {"code", "dec_dense", "dec_pixels", "dec_reshape",
                                          "recon"}


def test_subclassed_model_is_a_type_error() -> None:
    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, t: Any) -> Any:
            return self.dense(t)

    model = Sub()
    model(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="no layer graph"):
        TapGraph(model)


def test_unbuilt_sequential_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        TapGraph(keras.Sequential([L.Dense(2)]))


# --- shared passes -----------------------------------------------------------------------

def _shared_pass(model: keras.Model, outputs: list[str], rows: dict[str, list[bool]],
                 mode: str) -> tuple[Arrays, Arrays]:
    graph = TapGraph(model)
    plan = graph.plan(["x"], outputs)
    feeds = _tensors(zoo.sample_inputs(model, batch=len(next(iter(rows.values())))))
    masks = {o: _const(r) for o, r in rows.items()}
    if JAX:  # boolean masks have no static shape: eager only (the runtime masks after)
        got = plan(feeds, masks, lambda x, m: x[np.asarray(m)])
    elif mode == "eager":
        got = plan(feeds, masks, tf.boolean_mask)
    else:
        fn = tf.function(lambda f, r: plan(f, r, tf.boolean_mask), input_signature=[
            _signature(feeds), {o: tf.TensorSpec((None,), tf.bool) for o in outputs}])
        got = fn(feeds, masks)
    full = run_plan(plan, feeds, "eager")
    return _numpy(got), {o: full[o][np.array(rows[o])] for o in outputs}


@pytest.mark.parametrize("mode", MODES)
def test_shared_pass_gives_each_output_its_rows(mode: str, models: dict) -> None:
    got, want = _shared_pass(models["two_heads"], ["label", "branch_a"],
                             {"label": [True, False, True, True],
                              "branch_a": [False, True, True, False]}, mode)
    assert got["label"].shape[0] == 3 and got["branch_a"].shape[0] == 2
    assert_all_same(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_shared_pass_narrows_twice(mode: str, models: dict) -> None:
    """Three outputs: "merged" runs on label's rows taken from branch_a's (a subset of all)."""
    got, want = _shared_pass(models["two_heads"], ["label", "branch_a", "a_hidden"],
                             {"label": [True, False, False, True, False],
                              "branch_a": [False, False, True, True, False],
                              "a_hidden": [False, True, False, False, True]}, mode)
    assert_all_same(got, want)


def test_shared_pass_runs_a_head_only_on_its_rows(models: dict) -> None:
    """The label head sees only the rows that asked for label."""
    model = models["two_heads"]
    seen: list[int] = []
    head = model.get_layer("label_head")
    original = head.call

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(int(args[0].shape[0]))
        return original(*args, **kwargs)

    head.call = counting
    try:
        _shared_pass(model, ["label", "branch_a"],
                     {"label": [True, False, False, False],
                      "branch_a": [True, True, True, True]}, "eager")
    finally:
        del head.call
    assert seen[0] == 1


# --- Keras internals graph.py relies on --------------------------------------------------

def test_keras_internals_graph_surgery_relies_on(models: dict) -> None:
    """Fails loudly when a Keras upgrade moves what service/graph.py reads."""
    assert keras.__version__ == "3.15.1", "re-check service/graph.py before moving Keras"
    nested = models["nested"]
    depth = nested._nodes_by_depth
    assert isinstance(depth, dict) and all(isinstance(d, int) for d in depth)
    nodes = [n for d in sorted(depth, reverse=True) for n in depth[d]]
    assert nodes[0].is_input and not nodes[-1].is_input
    assert nodes[-1].operation is nested.get_layer("logits")
    for node in nodes:
        assert node in node.operation._inbound_nodes
        assert isinstance(node.input_tensors, list | tuple)
        assert isinstance(node.outputs, list | tuple) and node.outputs
    logits_node = nodes[-1]
    (arg,) = logits_node.input_tensors
    value = keras.ops.ones((2, *arg.shape[1:]))
    args, kwargs = logits_node.arguments.fill_in({id(arg): value})
    assert args[0] is value and isinstance(kwargs, dict)

    backbone = nested.get_layer("backbone")
    assert isinstance(backbone, keras.Sequential)
    assert isinstance(backbone._functional, keras.Model)
    assert hasattr(backbone._functional, "_nodes_by_depth")
    assert not hasattr(keras.Sequential([L.Dense(1)]), "_nodes_by_depth")
    assert keras.Sequential([L.Dense(1)])._functional is None

    two = models["two_heads"]
    assert isinstance(two._outputs_struct, dict)
    assert set(two._outputs_struct) == {"label", "score"}
    assert two._inputs_struct is two.inputs[0]  # a single input is kept bare
    siamese = models["siamese"]
    assert len(siamese.get_layer("shared")._inbound_nodes) == 2
    assert [t.name for t in siamese._inputs_struct] == ["left", "right"]
    # Layers that take `training` say so here; graph.py passes training=False to them.
    assert "training" in L.Dropout(0.5)._call_context_args
    # Keras lists dict outputs in sorted-key order (graph.py's names depend on it).
    assert [t._keras_history.operation.name for t in two.outputs] == ["label_head", "score_head"]


# --- models loaded from disk -------------------------------------------------------------

@pytest.mark.parametrize("name", ZOO)
def test_saved_and_reloaded_models_give_the_same_taps(name: str, tmp_path: Path,
                                                      models: dict) -> None:
    model = models[name]
    path = zoo.save(model, tmp_path / name, zoo.FORMATS.get(name, "keras"))
    loaded = keras.models.load_model(path, safe_mode=name not in zoo.UNSAFE)
    feeds = zoo.sample_inputs(model, batch=3)
    graph, got = all_taps(loaded, feeds, "function")
    original, want = all_taps(model, feeds, "function")
    assert set(graph.taps) == set(original.taps)
    assert graph.input_names == original.input_names
    assert graph.output_names == original.output_names
    assert_all_same(got, want)


def test_a_graph_built_with_a_fixed_batch_size_serves_any_batch() -> None:
    # Regression: a Sequential built by an eager call keeps that call's batch size in its
    # graph; taps must still accept any number of rows.
    model = keras.Sequential([keras.layers.Dense(3, name="d")], name="eager_built")
    model(np.zeros((2, 5), np.float32))
    graph = TapGraph(model)
    assert graph.tap("d").shape == (None, 3)
    x = np.random.default_rng(0).random((7, 5), dtype=np.float32)
    got = graph.plan(graph.input_names, ["d"])({graph.input_names[0]: _const(x)})
    np.testing.assert_allclose(got["d"], np.asarray(model(x)), atol=1e-5)
