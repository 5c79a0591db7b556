"""The digits example's explain endpoints and the picture (docs/images/gradcam.png).

The picture cannot go stale: this test trains the example models, serves them, runs
examples/gradcam.py against the server, checks that what it drew is the served Grad-CAM
(equal to the backend's own gradients on the model), and compares the regenerated picture with the
committed one pixel by pixel. Training is seeded but not bit-exact across CPUs, so the
comparison has a tolerance; a change to the model, the endpoint or the script fails it.
To refresh the picture: serve models/ and run `.venv/bin/python examples/gradcam.py`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import keras
import matplotlib.image
import numpy as np
import pytest
import zoo
from backend import needs_tensorflow
from explaining import gradient_of
from harness import RunningServer
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "gradcam.py"
PICTURE = ROOT / "docs" / "images" / "gradcam.png"
# Mean absolute difference per channel (0..1) allowed between the committed picture and
# the regenerated one. Measured: 1% noise on every map moves it by 0.0008, 5% by 0.0035;
# one digit's map drawn for another class by 0.009, every digit's by 0.067.
TOLERANCE = 0.005


def _script() -> ModuleType:
    return zoo.import_script(SCRIPT, "gradcam_example")



@pytest.fixture(scope="module")
def served(start_server, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[RunningServer, keras.Model, str]:
    repo = tmp_path_factory.mktemp("examples")
    zoo.write_examples(repo)
    port = free_port()
    server = start_server(repo, http_port=port)
    model = keras.models.load_model(repo / "digits_classifier" / "1" / "model.keras")
    return server, model, f"127.0.0.1:{port}"


def grad_cam(model: keras.Model, images: np.ndarray) -> np.ndarray:
    conv, digit = model.get_layer("conv").output, model.get_layer("digit").output
    a = np.asarray(keras.Model(model.inputs, conv)(images))
    back = keras.Model(conv, digit)  # the layers after conv, as Keras builds them
    best = np.argmax(np.asarray(back(a)), axis=-1)[:, None]
    g = gradient_of(lambda t: keras.ops.sum(keras.ops.take_along_axis(back(t), best, axis=1)),
                    a)
    weights = g.mean(axis=(1, 2), keepdims=True)
    return np.maximum((weights * a).sum(axis=-1), 0)


def test_the_example_serves_saliency_and_cam(served: tuple[RunningServer, keras.Model, str]
                                             ) -> None:
    server, model, _ = served
    images = _script().one_of_each_digit()
    cam = server.infer("digits_classifier.cam", {"image": images})["attribution"]
    np.testing.assert_allclose(cam, grad_cam(model, images), rtol=1e-4, atol=1e-6)
    saliency = server.infer("digits_classifier.saliency",
                            {"image": images, "target": np.full(10, 3, np.int64)})
    want = gradient_of(lambda x: keras.ops.sum(model(x)["digit"][:, 3]), images)
    np.testing.assert_allclose(saliency["attribution"], want, rtol=1e-4, atol=1e-6)


@needs_tensorflow  # the picture is of the model trained on TensorFlow: seeded training on
# jax draws other weights (its served Grad-CAM is checked above, on either backend)
def test_the_readme_picture_is_regenerated_from_a_served_grad_cam(
        served: tuple[RunningServer, keras.Model, str], tmp_path: Path) -> None:
    _, model, url = served
    script = _script()
    images, predicted, cams = script.heat_maps(url)
    np.testing.assert_allclose(cams, grad_cam(model, images), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(predicted, np.asarray(model(images)["digit"]).argmax(-1))
    out = tmp_path / "gradcam.png"
    assert script.main(["--url", url, "--out", str(out)]) == 0
    fresh, committed = matplotlib.image.imread(out), matplotlib.image.imread(PICTURE)
    assert fresh.shape == committed.shape == (script.SIZE[1], script.SIZE[0], 4)
    difference = float(np.abs(fresh - committed).mean())
    assert difference < TOLERANCE, (
        f"docs/images/gradcam.png differs from what the served model draws now (mean "
        f"{difference:.4f}): regenerate it (serve models/, run examples/gradcam.py)")
