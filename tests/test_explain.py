"""Explain endpoints (SPEC "Explanations") on a real in-process server: every kind, with
and without `target`, equal to the backend's own gradients on the Keras model
(tests/explaining.py);
the checks at load; integrated gradients' rows counted as `steps` rows; metadata and
metrics. The explanations go through the runtime's interface (`Runtime._explain`), so a
backend parametrization of the runtime picks these up."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import explaining
import grpc
import keras
import numpy as np
import pytest
import yaml
from backend import BACKEND, needs_tensorflow
from harness import RunningServer

from service.batcher import Batcher, BatchPolicy
from service.config import ExplainConfig, load_config
from service.errors import ConfigError, NotFound, Overloaded
from service.explain import check
from service.graph import TapGraph
from service.inspect import describe
from service.loading import build_saved_model
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.repository import ModelSource
from service.types import Batch

MODEL = explaining.MODEL


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keras.Model]:
    repo = tmp_path_factory.mktemp("models")
    return repo, explaining.write(repo)


@pytest.fixture(scope="module")
def server(start_server, repository: tuple[Path, keras.Model]) -> RunningServer:
    return start_server(repository[0])


@pytest.fixture(scope="module")
def model(repository: tuple[Path, keras.Model]) -> keras.Model:
    return repository[1]


def other_targets(model: keras.Model, endpoint: str, feeds: dict[str, np.ndarray]
                  ) -> np.ndarray:
    """A class per row that is not its argmax, so a target that were ignored shows."""
    head = explaining.ENDPOINTS[endpoint]["output"]
    argmax = np.argmax(np.asarray(model(feeds)[head]), axis=-1)
    return (argmax + 1) % explaining.CLASSES[head]


@pytest.mark.parametrize("target", [None, "int32", "int64"])
@pytest.mark.parametrize("endpoint", sorted(explaining.ENDPOINTS))
def test_every_kind_equals_gradient_tape(server: RunningServer, model: keras.Model,
                                         endpoint: str, target: str | None) -> None:
    feeds = explaining.inputs(3, seed=len(endpoint))
    classes = None if target is None else other_targets(model, endpoint, feeds)
    sent = feeds if classes is None else {**feeds, "target": classes.astype(target)}
    got = server.infer(f"{MODEL}.{endpoint}", sent)
    assert set(got) == {"attribution"}
    want = explaining.reference(model, endpoint, feeds, classes)
    assert got["attribution"].dtype == np.float32
    assert got["attribution"].shape == explaining.attribution_shape(endpoint, 3)
    np.testing.assert_allclose(got["attribution"], want, rtol=1e-4, atol=1e-6)
    if classes is not None:  # the target changed the answer: it is not the argmax's
        argmax_answer = explaining.reference(model, endpoint, feeds)
        assert not np.allclose(got["attribution"], argmax_answer, rtol=1e-4, atol=1e-6)


def test_requests_with_and_without_target_batch_together(server: RunningServer,
                                                         model: keras.Model) -> None:
    """Concurrent requests, some naming targets: each gets its own rows' answer."""
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    cases = []
    for i in range(8):
        feeds = explaining.inputs(1 + i % 3, seed=100 + i)
        classes = other_targets(model, "saliency", feeds) if i % 2 else None
        cases.append((feeds, classes))

    def send(i: int) -> None:
        feeds, classes = cases[i]
        sent = feeds if classes is None else {**feeds, "target": classes}
        try:
            results[i] = server.infer(f"{MODEL}.saliency", sent)["attribution"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, (feeds, classes) in enumerate(cases):
        want = explaining.reference(model, "saliency", feeds, classes)
        np.testing.assert_allclose(results[i], want, rtol=1e-4, atol=1e-6)


def test_more_rows_than_a_batch_are_split_and_match(server: RunningServer,
                                                    model: keras.Model) -> None:
    feeds = explaining.inputs(explaining.MAX_BATCH + 3, seed=5)  # ig: 4 steps a row
    got = server.infer(f"{MODEL}.ig", feeds)["attribution"]
    np.testing.assert_allclose(got, explaining.reference(model, "ig", feeds),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("target", "message"), [
    (np.array([0, 1], np.float32), "INT32 or INT64"),
    (np.array([0, 1, 2], np.int64), "expected [2]"),
    (np.array([0, 5], np.int64), "classes 0..4"),
    (np.array([-1, 0], np.int32), "classes 0..4"),
])
def test_a_bad_target_is_invalid_argument(server: RunningServer, target: np.ndarray,
                                          message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        server.infer(f"{MODEL}.cam", {**explaining.inputs(2), "target": target})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    server.infer(f"{MODEL}.cam", explaining.inputs(2))  # the endpoint still serves


def test_an_explanation_answers_no_taps(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        server.infer(f"{MODEL}.saliency", explaining.inputs(1), ["conv1"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "attribution" in caught.value.details()


def test_integrated_gradients_rows_count_as_steps_against_the_queue(
        server: RunningServer) -> None:
    # ig_kind: 20 steps a row, max_queue_size 100: 5 rows fit, 6 do not.
    server.infer(f"{MODEL}.ig_kind", explaining.inputs(5))
    with pytest.raises(grpc.RpcError) as caught:
        server.infer(f"{MODEL}.ig_kind", explaining.inputs(6))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "send at most 5 rows" in caught.value.details()


def test_a_bad_explain_endpoint_is_refused_and_the_others_serve(
        server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        server.infer(f"{MODEL}.flat_cam", explaining.inputs(1))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details()
    assert "refused at load" in details and "spatial axes" in details
    assert "conv1, conv2" in details  # what exists
    out = server.infer(f"{MODEL}.predict", explaining.inputs(2))
    assert set(out) == {"label", "kind"}


def test_metadata_lists_target_and_attribution(server: RunningServer) -> None:
    meta = server.stub.ModelMetadata(pb.ModelMetadataRequest(name=f"{MODEL}.cam"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "FP32", [-1, 8, 8, 2]), ("meta", "FP32", [-1, 3]), ("target", "INT64", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("attribution", "FP32", [-1, 4, 4])]


def test_explanations_count_under_their_endpoint_and_time_apart(
        server: RunningServer) -> None:
    ok = server.metric("tapserve_requests_total", model=MODEL, endpoint="cam_kind", code="OK")
    batches = server.metric("tapserve_explain_compute_duration_seconds_count",
                            model=MODEL, endpoint="cam_kind")
    server.infer(f"{MODEL}.cam_kind", explaining.inputs(2, seed=77))
    assert server.metric("tapserve_requests_total", model=MODEL, endpoint="cam_kind",
                         code="OK") == ok + 1
    assert server.metric("tapserve_explain_compute_duration_seconds_count", model=MODEL,
                         endpoint="cam_kind") == batches + 1
    # A forward pass is not an explanation.
    assert server.metric("tapserve_explain_compute_duration_seconds_count",
                         model=MODEL, endpoint="predict") == 0


def test_inspect_shows_explain_endpoints(repository: tuple[Path, keras.Model]) -> None:
    text = describe(repository[0] / MODEL)
    assert f"endpoint {MODEL}.cam: explains 'label' by gradcam over layer 'conv2'" in text
    assert f"endpoint {MODEL}.ig_kind: explains 'kind' by integrated_gradients of input " \
        "'image', 20 steps" in text
    assert "attribution" in text and "target" in text
    assert f"endpoint {MODEL}.flat_cam: refused:" in text


# ---- Checks at load (no server) -------------------------------------------------------


@pytest.fixture(scope="module")
def graph(model: keras.Model) -> TapGraph:
    return TapGraph(model)


@pytest.mark.parametrize(("config", "message"), [
    ({"explain": "gradient", "output": "conv2", "input": "image"},
     "not one score per class (floating, [-1, classes]); "
     "taps that are: dense, flat, join, kind, label"),
    ({"explain": "gradient", "output": "lable", "input": "image"}, "did you mean label"),
    ({"explain": "gradient", "output": "label"},
     "the model has inputs ['image', 'meta']: say which"),
    ({"explain": "integrated_gradients", "output": "label", "input": "picture"},
     "no input 'picture'; its inputs: image, meta"),
    ({"explain": "gradcam", "output": "kind", "layer": "flat"},
     "Grad-CAM needs spatial axes"),
    ({"explain": "gradcam", "output": "kind", "layer": "conv9"}, "did you mean conv2, conv1"),
])
def test_a_config_that_does_not_fit_is_refused_naming_what_exists(
        graph: TapGraph, config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check(graph, "model 'cnn', endpoint 'x'", "x", ExplainConfig(**config))
    assert message in str(caught.value)


def test_a_layer_or_input_that_does_not_feed_the_output_is_refused() -> None:
    a = keras.Input((4, 4, 1), name="a")
    b = keras.Input((2,), name="b")
    conv = keras.layers.Conv2D(2, 3, name="conv")(a)
    side = keras.layers.Dense(3, name="side")(b)
    graph = TapGraph(keras.Model([a, b], [side, keras.layers.Flatten(name="f")(conv)]))
    with pytest.raises(ConfigError, match="layer 'conv' does not feed output 'side'"):
        check(graph, "m", "x", ExplainConfig(explain="gradcam", output="side", layer="conv"))
    with pytest.raises(ConfigError, match="input 'a' does not feed output 'side'"):
        check(graph, "m", "x", ExplainConfig(explain="gradient", output="side", input="a"))


def test_an_integer_input_is_refused() -> None:
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(10, 4, name="embed")(tokens)
    out = keras.layers.Dense(3, name="out")(keras.layers.Flatten(name="flat")(h))
    graph = TapGraph(keras.Model(tokens, out))
    with pytest.raises(ConfigError, match="gradients need a floating input"):
        check(graph, "m", "x", ExplainConfig(explain="gradient", output="out"))
    # Grad-CAM over a layer after the embedding is fine: Conv1D-shaped [-1, 5, 4].
    _, spec = check(graph, "m", "x", ExplainConfig(explain="gradcam", output="out",
                                                     layer="embed"))
    assert spec.shape == (None, 5)


@pytest.mark.parametrize(("entry", "message"), [
    ({"explain": "integrated_gradients", "output": "y", "steps": 0}, "greater than or equal"),
    ({"explain": "integrated_gradients", "output": "y", "steps": 257}, "less than or equal"),
    ({"explain": "gradcam", "output": "y"}, "gradcam needs `layer`"),
    ({"explain": "gradient", "output": "y", "steps": 4}, "for integrated_gradients only"),
    ({"explain": "saliency", "output": "y"}, "'gradient', 'gradcam' or"),
])
def test_config_yaml_checks_each_explain_entry(tmp_path: Path, entry: dict,
                                               message: str) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"endpoints": {"e": entry}}))
    with pytest.raises(ConfigError, match="endpoints.e") as caught:
        load_config(tmp_path / "config.yaml")
    assert message in str(caught.value)


@needs_tensorflow
def test_a_savedmodel_refuses_explain_endpoints(tmp_path: Path) -> None:
    import tensorflow as tf

    x = keras.Input((3,), name="x")
    model = keras.Model(x, keras.layers.Dense(2, name="y")(x))
    tf.saved_model.save(model, str(tmp_path / "1"))
    config = load_config(tmp_path / "none.yaml").model_copy(update={"endpoints": {
        "s": ExplainConfig(explain="gradient", output="y")}})
    with pytest.raises(ConfigError, match="explain endpoints need the model's Keras layer "
                                          "graph.*serve a .keras or .h5 file"):
        build_saved_model(ModelSource("m", 1, tmp_path / "1", "saved_model", config),
                          ["/CPU:0"], 1)


# ---- Integrated gradients' cost in the batcher ------------------------------------------


async def test_a_weighted_row_counts_as_weight_rows_in_batches() -> None:
    """8 steps a row, max_batch_size 32: batches of at most 4 rows; a row whose steps
    alone pass max_batch_size is a batch of its own."""
    seen: list[int] = []

    async def run(batch: Batch) -> tuple[dict[str, np.ndarray], float, float]:
        seen.append(batch.rows)
        return {"y": batch.feeds["x"] * 2}, 0.0, 0.0

    batcher = Batcher(run, BatchPolicy(max_batch_size=32, max_queue_delay_ms=1, eager=False,
                                       dedup_rows=False), concurrency=1)
    batcher.start()
    x = np.arange(10, dtype=np.float32)[:, None]
    out, _ = await batcher.submit("ig", {"x": x}, ("y",), weight=8)
    np.testing.assert_array_equal(out["y"], x * 2)
    assert max(seen) == 4 and sum(seen) == 10
    seen.clear()
    out, _ = await batcher.submit("big", {"x": x[:3]}, ("y",), weight=100)
    assert seen == [1, 1, 1]
    with pytest.raises(Overloaded, match="send at most 10 rows"):  # 1100 > 1024
        await batcher.submit("big", {"x": np.zeros((11, 1), np.float32)}, ("y",), weight=100)
    await batcher.close(1)


@needs_tensorflow  # on jax: tests/test_runtime_jax.py
def test_a_row_of_many_steps_is_computed_in_chunks(model: keras.Model, graph: TapGraph
                                                   ) -> None:
    """256 steps with max_batch_size 8: the runtime runs 32 chunks of 8 scaled rows (never
    256 at once) and sums them to the reference."""
    import tensorflow as tf

    from service.runtime_tf import KerasRuntime

    explanation, _ = check(graph, "m", "ig", ExplainConfig(
        explain="integrated_gradients", output="kind", input="image", steps=256))
    runtime = KerasRuntime(graph, ["/CPU:0"], 1, max_batch_size=8)
    feeds = explaining.inputs(1, seed=3)
    batch = Batch(explanation, ("attribution",),
                  {**feeds, "target": np.array([-1], np.int64)}, None)
    asyncio.run(runtime.run(batch))  # builds the explainer
    explainer = runtime._explainers._built[explanation]
    traced, chunks = explainer._fn, []

    def counted(feeds: dict, alphas: np.ndarray) -> tf.Tensor:
        chunks.append(len(alphas))
        return traced(feeds, alphas)

    explainer._fn = counted
    got, _, _ = asyncio.run(runtime.run(batch))
    assert chunks == [8] * 32
    head = model(feeds)["kind"].numpy()
    total = 0
    for k in range(1, 257):
        x = tf.constant(feeds["image"] * (k / 256))
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = model({"image": x, "meta": tf.constant(feeds["meta"])})["kind"][
                0, int(head.argmax())]
        total += tape.gradient(score, x).numpy()
    np.testing.assert_allclose(got["attribution"], feeds["image"] * total / 256,
                               rtol=1e-4, atol=1e-6)
    runtime.close()


def test_an_output_with_no_gradient_is_refused_at_warm_up_and_the_others_serve(
        tmp_path: Path) -> None:
    """The output depends on the input only through an argmax: connected, yet no gradient
    flows. Its trace at warm-up says so; the model serves its other endpoints."""
    from service.loading import build_keras_model

    x = keras.Input((4,), name="x")
    scores = keras.layers.Dense(3, name="scores")(x)
    picked = keras.ops.expand_dims(keras.ops.cast(keras.ops.argmax(scores, axis=-1),
                                                  "float32"), -1)
    out = keras.layers.Dense(2, name="out")(picked)
    (tmp_path / "m" / "1").mkdir(parents=True)
    keras.Model(x, {"out": out, "scores": scores}).save(tmp_path / "m" / "1" / "model.keras")
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump({"endpoints": {
        "predict": {"inputs": ["x"], "outputs": ["out"]},
        "why": {"explain": "gradient", "output": "out"},
        "why_scores": {"explain": "gradient", "output": "scores"}}}))
    config = load_config(tmp_path / "m" / "config.yaml")
    model = build_keras_model(ModelSource("m", 1, tmp_path / "m" / "1" / "model.keras",
                                          "keras", config), ["/CPU:0"], 1, 8, 8,
                              backend=BACKEND)
    model.warm_up(True)
    assert set(model.endpoints) == {"predict", "why_scores"}
    assert "has no gradient with respect to 'x'" in model.refused["why"]
    with pytest.raises(NotFound, match="refused at load: .*no gradient"):
        model.endpoint("why")
    model.release()


def test_a_missing_input_says_target_is_optional(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        server.infer(f"{MODEL}.cam", {"image": explaining.inputs(1)["image"]})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing ['meta']" in caught.value.details()
    assert "optional target (int64 [-1])" in caught.value.details()
