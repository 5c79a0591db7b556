"""The TensorFlow runtime alone: compiled cuts, XLA padding, devices (GPUs mocked: none here)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from backend import JAX

if JAX:  # tf.function's traces, jit_compile and XLA_SHAPES, SavedModels, tf.device
    pytest.skip("TensorFlow's runtime: tests/test_runtime_jax.py is jax's",
                allow_module_level=True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import zoo  # noqa: E402
from savedmodels import HOSTILE  # noqa: E402

from service import runtime_tf as runtime_module
from service.errors import ConfigError
from service.graph import TapGraph
from service.runtime import Runtime
from service.runtime import pad_rows as _pad_rows
from service.runtime_tf import KerasRuntime, SavedModelRuntime, configure_tensorflow
from service.savedmodel_ops import disallowed_ops
from service.types import Batch


@pytest.fixture(scope="module")
def two_heads():
    model = zoo.build_two_heads()
    return model, TapGraph(model)


def reference(model, feeds):
    out = model(feeds["x"])
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("jit", [False, True])
def test_runtime_matches_keras_with_and_without_xla(two_heads, jit: bool) -> None:
    model, graph = two_heads
    rt = KerasRuntime(graph, ["/CPU:0"], 1, jit_compile=jit, max_batch_size=8)
    feeds = zoo.sample_inputs(model, batch=3)  # XLA pads 3 rows to 4, then trims
    got, _, _ = asyncio.run(rt.run(Batch(("x",), ("label", "score"), feeds, None)))
    compiled = rt.function(("x",), ("label", "score"), False).function_def.attr
    assert ("_XlaMustCompile" in compiled and compiled["_XlaMustCompile"].b) == jit
    want = reference(model, feeds)
    for name in ("label", "score"):
        assert got[name].shape[0] == 3
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)
    rt.close()


@pytest.mark.parametrize("jit", [False, True])
def test_shared_pass_rows_with_and_without_xla(two_heads, jit: bool) -> None:
    model, graph = two_heads
    rt = KerasRuntime(graph, ["/CPU:0"], 1, jit_compile=jit, max_batch_size=8)
    feeds = zoo.sample_inputs(model, batch=5)
    masks = {"label": np.array([1, 0, 1, 1, 0], bool), "score": np.array([0, 1, 1, 0, 1], bool)}
    got, _, _ = asyncio.run(rt.run(Batch(("x",), ("label", "score"), feeds, masks)))
    want = reference(model, feeds)
    for name, mask in masks.items():
        np.testing.assert_allclose(got[name], want[name][mask], atol=1e-5)
    rt.close()


def test_padding_sizes_are_powers_of_two_within_the_batch_limit() -> None:
    assert [_pad_rows(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert _pad_rows(40, 32) == 40  # beyond the limit (a split never sends it): as is


def test_compiled_cuts_are_cached_and_bounded(two_heads) -> None:
    _, graph = two_heads
    rt = KerasRuntime(graph, ["/CPU:0"], 1, cache_size=2)
    first = rt.function(("x",), ("label",), False)
    assert rt.function(("x",), ("label",), False) is first
    rt.function(("x",), ("score",), False)
    rt.function(("x",), ("branch_a",), False)
    assert len(rt._compiled.cached()) == 2 and rt.function(("x",), ("label",), False) is not first
    rt.close()


class FakeGPU:
    def __init__(self, i: int) -> None:
        self.name = f"/physical_device:GPU:{i}"
        self.device_type = "GPU"


def test_gpus_get_memory_growth_and_one_device_each(monkeypatch) -> None:
    grown, limited = [], []
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [FakeGPU(0), FakeGPU(1)] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                        lambda gpu, on: grown.append((gpu.name, on)))
    monkeypatch.setattr(tf.config, "set_logical_device_configuration",
                        lambda gpu, conf: limited.append((gpu.name, conf[0].memory_limit)))
    assert configure_tensorflow(1, 2, None) == ["/GPU:0", "/GPU:1"]
    assert grown == [("/physical_device:GPU:0", True), ("/physical_device:GPU:1", True)]
    assert configure_tensorflow(1, 2, 2048) == ["/GPU:0", "/GPU:1"]
    assert limited == [("/physical_device:GPU:0", 2048), ("/physical_device:GPU:1", 2048)]


def test_no_gpu_means_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert configure_tensorflow(1, 2, None) == ["/CPU:0"]


def test_batches_alternate_between_devices_each_on_its_own_threads(two_heads,
                                                                   monkeypatch) -> None:
    model, graph = two_heads
    placed = []
    real_device = runtime_module.tf.device

    def recording_device(name: str):
        placed.append((name, threading.current_thread().name))
        return real_device("/CPU:0")  # no GPU here: place on the CPU, record the intent

    monkeypatch.setattr(runtime_module.tf, "device", recording_device)
    rt = KerasRuntime(graph, ["/GPU:0", "/GPU:1"], batches_per_device=1)
    assert rt.slots == 2
    feeds = zoo.sample_inputs(model, batch=2)

    async def four() -> list:
        batch = Batch(("x",), ("label",), feeds, None)
        return await asyncio.gather(*(rt.run(batch) for _ in range(4)))

    results = asyncio.run(four())
    assert sorted(device for device, _ in placed) == ["/GPU:0", "/GPU:0", "/GPU:1", "/GPU:1"]
    assert all(thread.startswith(f"compute{device}") for device, thread in placed)
    for got, _, _ in results:
        np.testing.assert_allclose(got["label"], reference(model, feeds)["label"], atol=1e-5)
    rt.close()


def test_values_the_model_cannot_compute_are_invalid_input() -> None:
    from service.errors import InvalidInput

    model = zoo.build_multi_dtype()
    rt = KerasRuntime(TapGraph(model), ["/CPU:0"], 1)
    feeds = zoo.sample_inputs(model, batch=2)
    feeds["tokens"][1, 2] = zoo.TOKEN_VOCAB_SIZE + 10
    with pytest.raises(InvalidInput, match=r"indices\[1,2\] = 60 is not in \[0, 50\)"):
        asyncio.run(rt.run(Batch(("tokens", "features"), ("cls",), feeds, None)))
    rt.close()


def test_a_shared_pass_asking_part_of_the_warmed_one_traces_nothing(two_heads) -> None:
    """Model.warm_up traces the shared pass of all its endpoints' outputs; a batch that
    asks only some of them (say two requests for one output each) runs that pass instead
    of tracing a function of its own, which would stall the server for seconds."""
    model, graph = two_heads
    rt = KerasRuntime(graph, ["/CPU:0"], 1)
    union = ("branch_a", "branch_b", "label", "score")
    rt.warm_up(("x",), union, {o: np.array([True, i % 2 == 0]) for i, o in enumerate(union)})
    traced = set(rt._compiled.cached())
    feeds = zoo.sample_inputs(model, batch=4)
    masks = {"label": np.array([1, 1, 0, 0], bool), "branch_a": np.array([0, 0, 1, 1], bool)}
    got, _, _ = asyncio.run(rt.run(Batch(("x",), ("branch_a", "label"), feeds, masks)))
    assert set(rt._compiled.cached()) == traced
    assert sorted(got) == ["branch_a", "label"]
    probe = tf.keras.Model(model.inputs, model.get_layer("branch_a").output)
    np.testing.assert_allclose(got["label"], reference(model, feeds)["label"][:2], atol=1e-5)
    np.testing.assert_allclose(got["branch_a"], np.asarray(probe(feeds["x"]))[2:], atol=1e-5)
    # A tap outside the warmed pass still gets a function of its own.
    asyncio.run(rt.run(Batch(("x",), ("a_hidden", "label"), feeds,
                             {"label": masks["label"], "a_hidden": masks["branch_a"]})))
    assert len(rt._compiled.cached()) == len(traced) + 1
    rt.close()


class SlowRuntime(Runtime):
    """Takes `seconds` per batch on its one thread, returning the batch's inputs."""

    def __init__(self, seconds: float) -> None:
        super().__init__(["/CPU:0"], batches_per_device=1)
        self.seconds = seconds

    def _compute(self, batch: Batch) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        return dict(batch.feeds)


def test_compute_seconds_are_the_device_time_not_the_wait_for_a_thread() -> None:
    """tapserve_compute_duration_seconds reads what `run` reports: with one thread and two
    batches at once, the second waits a whole batch for the thread, which it must not count
    (under load the metric once read 16x the model's time)."""
    rt = SlowRuntime(0.1)
    batch = Batch(("x",), ("x",), {"x": np.zeros((1, 2), np.float32)}, None)

    async def two() -> list[tuple[float, float]]:
        async def timed() -> tuple[float, float]:
            started = time.perf_counter()
            _, began, ended = await rt.run(batch)
            return time.perf_counter() - started, ended - began
        return await asyncio.gather(timed(), timed())

    (wall_first, first), (wall_second, second) = sorted(asyncio.run(two()))
    assert wall_second >= 0.19  # it waited for the first batch's thread...
    assert 0.09 <= second < 0.19 and 0.09 <= first < 0.19  # ...and did not count that wait
    rt.close()


def counting_builds(rt: KerasRuntime) -> list[tuple]:
    """Record every function `rt` traces (its `_build` calls), in order."""
    built: list[tuple] = []
    build = rt._build

    def counted(inputs, outputs, masked, *jit):
        built.append((inputs, tuple(outputs), masked))
        return build(inputs, outputs, masked, *jit)

    rt._build = counted
    return built


def test_the_same_taps_in_another_order_trace_once(two_heads) -> None:
    """The compiled-function key is the set of outputs, not the request's order: asking
    (label, score) then (score, label) once traced twice, on the request path."""
    model, graph = two_heads
    rt = KerasRuntime(graph, ["/CPU:0"], 1)
    built = counting_builds(rt)
    feeds = zoo.sample_inputs(model, batch=2)
    for outputs in (("label", "score"), ("score", "label")):
        got, _, _ = asyncio.run(rt.run(Batch(("x",), outputs, feeds, None)))
        np.testing.assert_allclose(got["score"], reference(model, feeds)["score"], atol=1e-5)
    assert len(built) == 1, built
    rt.close()


@pytest.mark.parametrize(("masked", "jit"), [(False, False), (True, False), (True, True)])
def test_a_client_cycling_tap_subsets_cannot_keep_the_runtime_tracing(two_heads, masked: bool,
                                                                      jit: bool) -> None:
    """Each new subset of taps traced a function on the request path (0.1 s here, seconds
    on a deep model, holding the GIL), and a client cycling more subsets than the cache
    holds retraced forever. Beyond the model's trace budget, the full pass of every tap
    serves (one trace more), the outputs not asked for dropped."""
    model, graph = two_heads
    rt = KerasRuntime(graph, ["/CPU:0"], 1, cache_size=2, jit_compile=jit, trace_budget=3)
    built = counting_builds(rt)
    taps = ["a_hidden", "branch_a", "b_hidden", "branch_b", "merged", "label", "score"]
    subsets = [(a, b) for i, a in enumerate(taps) for b in taps[i + 1:]]  # 21 of them
    feeds = zoo.sample_inputs(model, batch=4)
    probe = keras.Model(model.inputs, {
        "label": model.output["label"], "score": model.output["score"],
        **{n: model.get_layer(n).output for n in taps[:5]}})
    want = {k: np.asarray(v) for k, v in probe(feeds["x"]).items()}
    rows = np.array([True, False, True, True])
    for outputs in subsets * 2:
        masks = {outputs[0]: rows, outputs[1]: ~rows} if masked else None
        got, _, _ = asyncio.run(rt.run(Batch(("x",), outputs, feeds, masks)))
        assert sorted(got) == sorted(outputs)
        for name in outputs:
            keep = slice(None) if masks is None else masks[name]
            np.testing.assert_allclose(got[name], want[name][keep], atol=1e-5)
    assert len(built) == 3 + 1, built  # the budget, then the full pass once
    rt.close()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_saved_models_that_read_or_write_files_are_refused_at_load(tmp_path, name) -> None:
    """A CsvDataset answered clients with a file's first line, SaveV2 wrote files during
    warm-up, Dataset.cache loads: a deny-list of file ops let each through."""
    write, op = HOSTILE[name]
    target = tmp_path / "target.csv"
    target.write_text("the server's own line\n")
    write(tmp_path / "model", target)
    with pytest.raises(ConfigError, match=rf"outside the server's allow-list \[[^]]*'{op}'"):
        SavedModelRuntime(tmp_path / "model", ["/CPU:0"], 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "target.csv"]  # nothing ran
    SavedModelRuntime(tmp_path / "model", ["/CPU:0"], 1, allow_file_ops=True).close()


@pytest.mark.parametrize("name", ["autoencoder", "multi_dtype", "string_input", "siamese"])
def test_ordinary_saved_models_use_only_allowed_ops(tmp_path, name) -> None:
    """Keras 3 `model.export` and `tf.saved_model.save` of a Keras model both load."""
    model = zoo.ZOO[name]()
    model.export(tmp_path / "export", verbose=False)
    tf.saved_model.save(model, str(tmp_path / "save"))
    for folder in ("export", "save"):
        assert disallowed_ops(tmp_path / folder) == []
        SavedModelRuntime(tmp_path / folder, ["/CPU:0"], 1).close()


def test_xla_compiles_a_bounded_number_of_sequence_lengths() -> None:
    """Under jit_compile a dynamic axis compiled every new length (~90 ms on the request
    path, 0.31 MB kept for good, without bound). XLA now sees at most `xla_shapes` input
    shapes; other lengths run the same cut without it, with the same answers."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(20, 4, mask_zero=True, name="embed")(tokens)
    state = keras.layers.GRU(3, name="gru")(embedded)
    model = keras.Model(tokens, {"state": state, "per_token": embedded})
    rt = KerasRuntime(TapGraph(model), ["/CPU:0"], 1, jit_compile=True, xla_shapes=3)
    xla_lengths = set()
    build = rt._build

    def recording(inputs, outputs, masked, jit):
        fn = build(inputs, outputs, masked, jit)
        if not jit:
            return fn
        return lambda feeds: xla_lengths.add(feeds["tokens"].shape[1]) or fn(feeds)

    rt._build = recording
    for length in range(1, 11):
        x = np.random.default_rng(length).integers(1, 20, size=(3, length)).astype(np.int32)
        got, _, _ = asyncio.run(rt.run(Batch(("tokens",), ("per_token", "state"), {"tokens": x},
                                          None)))
        want = model(x)
        np.testing.assert_allclose(got["state"], np.asarray(want["state"]), atol=1e-5)
        assert got["per_token"].shape == (3, length, 4)
    assert xla_lengths == {1, 2, 3}, xla_lengths
    rt.close()
