"""The test-model zoo itself: every model builds, saves, reloads and predicts the same."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
import zoo
from backend import JAX, needs_tensorflow

# JAX has no string tensors: string_input is TensorFlow's alone.
ZOO = sorted(n for n in zoo.ZOO if not (JAX and n == "string_input"))


def _call(model: keras.Model, inputs: dict[str, np.ndarray]) -> dict[Any, np.ndarray]:
    """Run the model eagerly on ``inputs`` and return its outputs keyed by name or index."""
    tensors = [keras.ops.convert_to_tensor(inputs[n]) for n in zoo.input_names(model)]
    result = model(tensors[0] if len(tensors) == 1 else tensors)
    if isinstance(result, dict):
        return {k: np.asarray(v) for k, v in result.items()}
    if isinstance(result, list | tuple):
        return {i: np.asarray(v) for i, v in enumerate(result)}
    return {0: np.asarray(result)}


def _load(name: str, path: Path) -> keras.Model:
    return keras.models.load_model(path, safe_mode=name not in zoo.UNSAFE)


@pytest.mark.parametrize("name", ZOO)
def test_builds_saves_reloads_and_predicts_the_same(name: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    model = zoo.ZOO[name]()
    # Eager JAX compiles each op at its first shapes: a first build costs seconds more.
    assert time.perf_counter() - start < (30.0 if JAX else 5.0), "zoo models must stay small"

    fmt = zoo.FORMATS.get(name, "keras")
    path = zoo.save(model, tmp_path / name, fmt)
    assert path == tmp_path / name / "1" / f"model.{fmt}"
    assert path.is_file()

    loaded = _load(name, path)
    assert zoo.input_names(loaded) == zoo.input_names(model)
    inputs = zoo.sample_inputs(model, batch=3)
    expected, got = _call(model, inputs), _call(loaded, inputs)
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key].shape[0] == 3
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ZOO)
def test_builders_are_deterministic(name: str) -> None:
    first, second = zoo.ZOO[name](), zoo.ZOO[name]()
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


EXPECTED_LAYERS = {
    "autoencoder": {"image", "enc_conv", "enc_flat", "enc_dense", "code", "dec_dense",
                    "dec_pixels", "dec_reshape", "recon"},
    "two_heads": {"x", "a_hidden", "branch_a", "b_hidden", "branch_b", "merged",
                  "label_head", "score_head"},
    "sequential": {"dense_1", "dense_2", "out"},
    "siamese": {"left", "right", "shared", "diff", "similarity"},
    "nested": {"x", "stem", "backbone", "logits"},
    "multi_dtype": {"tokens", "features", "embed", "pool", "feat_dense", "concat", "cls", "reg"},
    "legacy_h5": {"inp", "hidden", "out"},
    "string_input": {"text", "lookup", "embed", "out"},
    "lambda_layer": {"x", "pre", "double", "out"},
}


@pytest.mark.parametrize("name", ZOO)
def test_layer_names_are_stable(name: str) -> None:
    # Other tests (graph surgery, end to end) name these layers: keep them fixed.
    assert {layer.name for layer in zoo.ZOO[name]().layers} == EXPECTED_LAYERS[name]


def test_sequential_input_is_auto_named() -> None:
    model = zoo.build_sequential()
    (name,) = zoo.input_names(model)
    assert name == "input_layer" or name.startswith("input_layer_")
    assert model.inputs[0].shape == (None, 10)


def test_siamese_abs_is_an_operation_not_a_layer() -> None:
    model = zoo.build_siamese()
    # Auto-named like an unnamed layer: "absolute", or "absolute_<n>" after others.
    ops = [op.name for op in model.operations if op.name not in EXPECTED_LAYERS["siamese"]]
    assert len(ops) == 1 and ops[0].startswith("absolute")
    assert ops[0] not in {layer.name for layer in model.layers}
    assert len(model.get_layer("shared")._inbound_nodes) == 2


def test_two_heads_dict_outputs() -> None:
    model = zoo.build_two_heads()
    out = _call(model, zoo.sample_inputs(model))
    assert set(out) == {"label", "score"}
    assert out["label"].shape == (4, 3) and out["score"].shape == (4, 1)


def test_lambda_layer_refused_in_safe_mode(tmp_path: Path) -> None:
    path = zoo.save(zoo.build_lambda_layer(), tmp_path / "lambda_layer")
    with pytest.raises(ValueError, match="Lambda"):
        keras.models.load_model(path)


@needs_tensorflow
def test_string_input_takes_bytes(tmp_path: Path) -> None:
    import tensorflow as tf

    loaded = keras.models.load_model(zoo.save(zoo.build_string_input(), tmp_path / "s"))
    out = loaded(tf.constant([b"red", b"never-seen", b"blue"]))
    assert out.shape == (3, 2)


def _resolve(model: keras.Model, name: str) -> None:
    """Fail unless ``name`` is an input, output or tap of ``model`` (SPEC.md tap names)."""
    outputs = model.output.keys() if isinstance(model.output, dict) else model.output_names
    if name in zoo.input_names(model) or name in outputs:
        return
    path, _, call = name.partition(":")
    layer: Any = model
    for part in path.split("/"):
        layer = layer.get_layer(part)
    if call:
        assert int(call) < len(layer._inbound_nodes), f"{name}: no call {call}"


@pytest.mark.parametrize("name", sorted(zoo.CONFIGS))
def test_configs_name_what_the_model_has(name: str, tmp_path: Path) -> None:
    path = zoo.write_model(name, tmp_path)
    config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
    assert config == zoo.CONFIGS[name]
    assert config["default_endpoint"] in config["endpoints"]
    model = _load(name, path)
    for endpoint in config["endpoints"].values():
        for tensor_name in endpoint["inputs"] + endpoint["outputs"]:
            _resolve(model, tensor_name)
