"""The jax runtime alone: the batch-size ladder compiled at warm-up (no compile on the
request path for any batch up to max_batch_size), the bound on compiled executables, shared
passes' masks, the compile budget, index checks and the refusals of what JAX cannot run.
Runs with TAPSERVE_BACKEND=jax (tests/test_runtime.py is TensorFlow's counterpart)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from backend import JAX

if not JAX:
    pytest.skip("the jax runtime: runs with TAPSERVE_BACKEND=jax", allow_module_level=True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import zoo  # noqa: E402

from service.config import load_config  # noqa: E402
from service.errors import ConfigError, InvalidInput, Overloaded  # noqa: E402
from service.graph import TapGraph  # noqa: E402
from service.loading import build_keras_model, build_saved_model  # noqa: E402
from service.repository import ModelSource  # noqa: E402
from service.runtime_jax import JaxRuntime, ladder, rung  # noqa: E402
from service.types import Batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_heads():
    model = zoo.build_two_heads()
    return model, TapGraph(model)


def reference(model, feeds):
    return {k: np.asarray(v) for k, v in model(feeds["x"]).items()}


def run(rt: JaxRuntime, outputs: tuple[str, ...], feeds, masks=None):
    got, _, _ = asyncio.run(rt.run(Batch(("x",), outputs, feeds, masks)))
    return got


def test_the_ladder_is_powers_of_two_and_the_limit() -> None:
    assert ladder(32) == (1, 2, 4, 8, 16, 32)
    assert ladder(24) == (1, 2, 4, 8, 16, 24)
    assert ladder(1) == (1,)
    assert [rung(n, ladder(24)) for n in (1, 3, 5, 17, 24, 30)] == [1, 4, 8, 24, 24, 30]


def test_warm_up_compiles_the_ladder_and_no_batch_size_compiles_after(two_heads) -> None:
    model, graph = two_heads
    rt = JaxRuntime(graph, ["/CPU:0"], 1, max_batch_size=12)
    rt.warm_up(("x",), ("score", "label"))  # an endpoint's order: requests find it sorted
    compiled = rt.compiles
    assert compiled == len(ladder(12)) == 5  # 1, 2, 4, 8, 12
    for rows in range(1, 13):
        feeds = zoo.sample_inputs(model, batch=rows, seed=rows)
        got = run(rt, ("label", "score"), feeds)
        want = reference(model, feeds)
        for name in ("label", "score"):  # padded with copies of the last row, then sliced
            assert got[name].shape[0] == rows
            np.testing.assert_allclose(got[name], want[name], atol=1e-5)
    assert rt.compiles == compiled
    rt.close()


def test_compiled_executables_are_bounded_and_warm_up_s_kept(two_heads) -> None:
    model, graph = two_heads
    rt = JaxRuntime(graph, ["/CPU:0"], 1, cache_size=2, max_batch_size=4)
    rt.warm_up(("x",), ("label",))
    feeds = zoo.sample_inputs(model, batch=3)
    for tap in ("score", "branch_a", "merged"):  # each a cut of its own, on the request path
        np.testing.assert_allclose(run(rt, (tap,), feeds)[tap],
                                   np.asarray(keras.Model(model.inputs,
                                                          model.get_layer(tap).output)(
                                       feeds["x"])) if tap != "score" else
                                   reference(model, feeds)["score"], atol=1e-5)
    assert rt.cached_executables() == 2
    before = rt.compiles
    run(rt, ("label",), feeds)  # warm-up's executable was never evicted
    assert rt.compiles == before
    rt.close()


def test_a_shared_pass_computes_every_row_and_masks_after(two_heads) -> None:
    model, graph = two_heads
    rt = JaxRuntime(graph, ["/CPU:0"], 1, max_batch_size=8)
    union = ("label", "score")
    rt.warm_up(("x",), union, {o: np.array([True, i % 2 == 0]) for i, o in enumerate(union)})
    compiled = rt.compiles
    feeds = zoo.sample_inputs(model, batch=5)
    masks = {"label": np.array([1, 0, 1, 1, 0], bool), "score": np.array([0, 1, 1, 0, 1], bool)}
    got = run(rt, union, feeds, masks)
    want = reference(model, feeds)
    for name, mask in masks.items():
        np.testing.assert_allclose(got[name], want[name][mask], atol=1e-5)
    got = run(rt, ("score",), feeds, {"score": masks["score"]})  # widened to the warm pass
    np.testing.assert_allclose(got["score"], want["score"][masks["score"]], atol=1e-5)
    assert rt.compiles == compiled
    rt.close()


def test_past_the_budget_taps_run_the_full_pass_and_new_shapes_are_refused() -> None:
    keras.utils.set_random_seed(1)
    x = keras.Input((None, 3), name="x")  # a sequence of any length
    h = keras.layers.Dense(4, name="hidden")(x)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    model = keras.Model(x, keras.layers.Dense(2, name="y")(pooled))
    rt = JaxRuntime(TapGraph(model), ["/CPU:0"], 1, max_batch_size=2, trace_budget=1)
    rt.warm_up(("x",), ("y",))
    seq = np.random.default_rng(0).random((2, 5, 3), dtype=np.float32)
    want = np.asarray(model(seq))
    np.testing.assert_allclose(run(rt, ("y",), {"x": seq})["y"], want, atol=1e-5)  # budget
    got = run(rt, ("pool",), {"x": seq})  # past it, a shape compiled for: the full pass
    np.testing.assert_allclose(got["pool"], np.asarray(keras.ops.mean(
        model.get_layer("hidden")(seq), axis=1)), atol=1e-5)
    with pytest.raises(Overloaded, match="budget of 1 compiles per 60 s"):
        run(rt, ("y",), {"x": seq[:, :4]})
    rt.close()


def test_an_index_outside_an_embedding_is_invalid_input() -> None:
    model = zoo.build_multi_dtype()
    rt = JaxRuntime(TapGraph(model), ["/CPU:0"], 1)
    feeds = zoo.sample_inputs(model, batch=2)
    got, _, _ = asyncio.run(rt.run(Batch(("tokens", "features"), ("cls",), feeds, None)))
    np.testing.assert_allclose(got["cls"], np.asarray(model(feeds)[0]), atol=1e-5)
    assert got["cls"].dtype == np.float32
    feeds["tokens"][1, 2] = zoo.TOKEN_VOCAB_SIZE + 10
    with pytest.raises(InvalidInput, match=r"indices\[1,2\] = 60 is not in \[0, 50\)"):
        asyncio.run(rt.run(Batch(("tokens", "features"), ("cls",), feeds, None)))
    rt.close()


def test_outputs_have_the_dtype_their_spec_says() -> None:
    """JAX computes 64-bit inputs as 32-bit (x64 off, as Keras leaves it): the input's spec
    stays int64 for clients, and each output answers the dtype its spec says."""
    x = keras.Input((3,), dtype="int64", name="x")
    model = keras.Model(x, keras.ops.add(x, 1))
    graph = TapGraph(model)
    rt = JaxRuntime(graph, ["/CPU:0"], 1, max_batch_size=2)
    out = graph.output_names[0]
    got, _, _ = asyncio.run(rt.run(Batch(("x",), (out,), {"x": np.arange(6).reshape(2, 3)},
                                      None)))
    assert rt.spec("x").dtype == "int64"
    assert got[out].dtype.name == rt.spec(out).dtype
    assert got[out].tolist() == [[1, 2, 3], [4, 5, 6]]
    rt.close()


def test_string_models_are_refused_naming_the_backend(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow", reason="building a StringLookup model needs TensorFlow")
    path = zoo.save(zoo.build_string_input(), tmp_path / "words")
    source = ModelSource("words", 1, path, "keras", load_config(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match="model 'words' has (TensorFlow-only layers "
                       r"\(StringLookup\)|string tensors).*--backend tensorflow; this "
                       "server runs jax"):
        build_keras_model(source, ["/CPU:0"], 1, 8, 8, backend="jax")


def test_a_savedmodel_is_refused_naming_the_backend(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"")
    source = ModelSource("sm", 1, tmp_path / "1", "saved_model",
                         load_config(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match="model 'sm' is a TensorFlow SavedModel: it serves "
                                          "with --backend tensorflow; this server runs jax"):
        build_saved_model(source, ["/CPU:0"], 1, backend="jax")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="building a StringLookup model needs TensorFlow")
def test_a_server_on_jax_refuses_what_needs_tensorflow_and_serves_the_rest(
        start_server, tmp_path: Path) -> None:
    zoo.write_model("two_heads", tmp_path)
    zoo.write_model("string_input", tmp_path)
    (tmp_path / "sm" / "1").mkdir(parents=True)
    (tmp_path / "sm" / "1" / "saved_model.pb").write_bytes(b"")
    server = start_server(tmp_path, backend="jax", strict_readiness=False)
    model = zoo.build_two_heads()
    feeds = zoo.sample_inputs(model, batch=3)
    np.testing.assert_allclose(server.infer("two_heads", feeds)["label"],
                               reference(model, feeds)["label"], atol=1e-5)
    index = {row[0]: row for row in server.server.registry.index()}
    assert "--backend tensorflow; this server runs jax" in index["string_input"][-1]
    assert "is a TensorFlow SavedModel: it serves with --backend tensorflow" in index["sm"][-1]


TWO_DEVICES = """
import asyncio, numpy as np, zoo
from service import backends
backends.select("jax")
import jax
from service.graph import TapGraph
from service.runtime_jax import JaxRuntime
from service.types import Batch
assert len(jax.devices("cpu")) == 2
model = zoo.build_two_heads()
rt = JaxRuntime(TapGraph(model), ["/CPU:0", "/CPU:1"], 1, max_batch_size=4)
rt.warm_up(("x",), ("label",))
compiled = rt.compiles
feeds = zoo.sample_inputs(model, batch=3)
async def four():
    batch = Batch(("x",), ("label",), feeds, None)
    return await asyncio.gather(*(rt.run(batch) for _ in range(4)))
for got, _, _ in asyncio.run(four()):
    np.testing.assert_allclose(got["label"], np.asarray(model(feeds["x"])["label"]), atol=1e-5)
assert sorted(v[0].devices().pop().id for v in rt._values.values()) == [0, 1]
print(compiled, rt.compiles)
"""


def test_two_devices_each_hold_the_weights_and_their_own_executables() -> None:
    """Two host devices stand in for two GPUs: each gets the weights once and the whole
    ladder at warm-up, and batches on either compute the same."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = subprocess.run([sys.executable, "-c", TWO_DEVICES], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == [str(2 * len(ladder(4)))] * 2  # no compile after


def test_integrated_gradients_compile_the_sizes_their_batches_take() -> None:
    """5 steps a row, max_batch_size 32: batches of up to 6 rows, padded to 8 at most."""
    import explaining

    from service.config import ExplainConfig
    from service.explain import check

    model = explaining.build()
    graph = TapGraph(model)
    explanation, _ = check(graph, "m", "ig", ExplainConfig(
        explain="integrated_gradients", output="kind", input="image", steps=5))
    rt = JaxRuntime(graph, ["/CPU:0"], 1, max_batch_size=32)
    rt.warm_up(explanation, ("attribution",))
    compiled = rt.compiles
    assert compiled == 4  # 1, 2, 4, 8
    feeds = {**explaining.inputs(6, seed=2), "target": np.full(6, -1, np.int64)}
    got, _, _ = asyncio.run(rt.run(Batch(explanation, ("attribution",), feeds, None)))
    assert rt.compiles == compiled
    x, meta = feeds["image"], keras.ops.convert_to_tensor(feeds["meta"])
    best = np.argmax(np.asarray(model({"image": x, "meta": feeds["meta"]})["kind"]), axis=-1)
    total = sum(explaining.gradient_of(
        lambda t: explaining._score(model({"image": t, "meta": meta})["kind"], best),
        x * (k / 5)) for k in range(1, 6))
    np.testing.assert_allclose(got["attribution"], x * total / 5, rtol=1e-4, atol=1e-6)
    rt.close()
