"""A conv classifier with two heads and the explanations of it computed here, with the
backend's own gradients (tf.GradientTape or jax.grad) on the Keras model itself: what every
explain endpoint must answer (tests/test_explain.py in-process, tests/e2e/test_explain.py
through the stock clients)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import yaml

MODEL = "cnn"
CLASSES = {"label": 5, "kind": 3}
MAX_BATCH = 8
# kind, head, what it attributes to or weighs, steps: the reference for each endpoint.
ENDPOINTS: dict[str, dict[str, Any]] = {
    "saliency": {"explain": "gradient", "output": "label", "input": "image"},
    "saliency_kind": {"explain": "gradient", "output": "kind", "input": "image"},
    "cam": {"explain": "gradcam", "output": "label", "layer": "conv2"},
    "cam_kind": {"explain": "gradcam", "output": "kind", "layer": "conv1"},
    "ig": {"explain": "integrated_gradients", "output": "label", "input": "image", "steps": 4},
    # More steps than max_batch_size: one row is a piece of its own, computed in chunks.
    "ig_kind": {"explain": "integrated_gradients", "output": "kind", "input": "image",
                "steps": 20},
}
REFUSED = {"flat_cam": {"explain": "gradcam", "output": "label", "layer": "dense"}}
CONFIG = {
    "endpoints": {"predict": {"inputs": ["image", "meta"], "outputs": ["label", "kind"]},
                  **ENDPOINTS, **REFUSED},
    "default_endpoint": "predict",
    "batching": {"max_batch_size": MAX_BATCH, "max_queue_size": 100},
}


def build() -> keras.Model:
    """image (8,8,2) and meta (3,) -> conv1 (8x8x4) -> conv2 (4x4x6) -> dense (+ meta)
    -> {"label": softmax 5, "kind": logits 3}."""
    keras.utils.set_random_seed(7)
    image = keras.Input((8, 8, 2), name="image")
    meta = keras.Input((3,), name="meta")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(image)
    h = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="tanh",
                            name="conv2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Concatenate(name="join")([h, meta])
    h = keras.layers.Dense(16, activation="tanh", name="dense")(h)
    outputs = {"label": keras.layers.Dense(5, activation="softmax", name="label")(h),
               "kind": keras.layers.Dense(3, name="kind")(h)}
    return keras.Model({"image": image, "meta": meta}, outputs, name=MODEL)


def write(repository: Path) -> keras.Model:
    """The model and its config.yaml into `repository`/cnn; returns the model."""
    model = build()
    (repository / MODEL / "1").mkdir(parents=True)
    model.save(repository / MODEL / "1" / "model.keras")
    (repository / MODEL / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    return model


def inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((rows, 8, 8, 2), dtype=np.float32),
            "meta": rng.random((rows, 3), dtype=np.float32)}


def gradient_of(fn: Any, x: np.ndarray) -> np.ndarray:
    """The gradient of fn (a tensor to a scalar) at x, by the backend keras runs on."""
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.grad(fn)(x))
    import tensorflow as tf

    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        score = fn(t)
    return np.asarray(tape.gradient(score, t))


def _score(scores: Any, target: np.ndarray) -> Any:
    """The sum over rows of each row's target score."""
    index = np.asarray(target, np.int32)[:, None]
    return keras.ops.sum(keras.ops.take_along_axis(scores, index, axis=1))


# The layers after each Grad-CAM layer, in order (build()'s graph): what maps its output
# (with `meta`) to the heads, called layer by layer, apart from the server's graph code.
_AFTER = {"conv1": ["conv2", "flat"], "conv2": ["flat"]}


def reference(model: keras.Model, endpoint: str, feeds: dict[str, np.ndarray],
              target: np.ndarray | None = None) -> np.ndarray:
    """What `endpoint` must answer, computed from its definition with the backend's
    gradients on the Keras model."""
    spec = ENDPOINTS[endpoint]
    head = spec["output"]
    argmax = np.argmax(np.asarray(model(feeds)[head]), axis=-1)  # of the input itself
    chosen = argmax if target is None else target
    if spec["explain"] == "gradcam":
        layer = spec["layer"]
        cut = keras.Model(model.inputs, model.get_layer(layer).output)
        a = np.asarray(cut(feeds))

        def back(a: Any) -> Any:
            h = a
            for name in _AFTER[layer]:
                h = model.get_layer(name)(h)
            meta = keras.ops.convert_to_tensor(feeds["meta"])
            h = model.get_layer("dense")(model.get_layer("join")([h, meta]))
            return _score(model.get_layer(head)(h), chosen)

        g = gradient_of(back, a)
        weights = g.mean(axis=(1, 2), keepdims=True)
        return np.maximum((weights * a).sum(axis=-1), 0)

    def gradient(x: np.ndarray) -> np.ndarray:
        meta = keras.ops.convert_to_tensor(feeds["meta"])  # with a tensor: not mixed
        return gradient_of(lambda t: _score(model({"meta": meta, "image": t})[head], chosen), x)

    if spec["explain"] == "gradient":
        return gradient(feeds["image"])
    steps = spec["steps"]
    total = sum(gradient(feeds["image"] * (k / steps)) for k in range(1, steps + 1))
    return feeds["image"] * total / steps


def attribution_shape(endpoint: str, rows: int) -> tuple[int, ...]:
    return (rows, 8, 8, 2) if ENDPOINTS[endpoint]["explain"] != "gradcam" else (
        (rows, 4, 4) if ENDPOINTS[endpoint]["layer"] == "conv2" else (rows, 8, 8))
