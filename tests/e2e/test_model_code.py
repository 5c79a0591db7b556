"""End to end: models whose custom layers come as Python code in their version folder
(config.yaml `code:`), served only with --allow-model-code."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from backends import frontend_only
from scrape import wait_for
from stock import infer
from tritonclient.utils import InferenceServerException

# Two models each bring a `layers.py` registering the same name, "Tapserve>Scale", with
# different arithmetic: each must be served with its own.
LAYERS = '''
import keras

from .blocks import describe  # relative imports work inside the version's code


@keras.saving.register_keras_serializable(package="Tapserve")
class Scale(keras.layers.Layer):
    """{doc}"""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.about = describe()

    def call(self, x):
        return {op}

    def get_config(self):
        return {{**super().get_config(), "factor": self.factor}}
'''
BLOCKS = 'def describe():\n    return "{doc}"\n'
VARIANTS = {"times": ("x * self.factor", "multiplies"), "plus": ("x + self.factor", "adds")}


def until(condition: Callable[[], Any], timeout: float = 30) -> Any:
    """Wait for the server to catch up (the failing line says with what)."""
    return wait_for(condition, "the condition on the calling line", timeout)


def write_code_model(repository: Path, name: str, variant: str) -> tuple[keras.Model, Path]:
    """Model `name`: x (4,) -> "pre" -> "scaled" (the custom layer) -> "post"."""
    op, doc = VARIANTS[variant]
    folder = repository / name / "1"
    (folder / "blocks").mkdir(parents=True)
    (folder / "blocks" / "__init__.py").write_text(BLOCKS.format(doc=doc))
    (folder / "layers.py").write_text(LAYERS.format(op=op, doc=doc))
    # Import it here under a name of its own, as the server will, to build the model.
    package = f"code_{name}"
    spec = importlib.util.spec_from_file_location(
        package, folder / "__init__.py", submodule_search_locations=[str(folder)])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    layers = importlib.import_module(f"{package}.layers")
    keras.utils.set_random_seed(7)
    x = keras.Input(shape=(4,), name="x")
    pre = keras.layers.Dense(3, name="pre")(x)
    scaled = layers.Scale(2.0, name="scaled")(pre)
    post = keras.layers.Dense(2, name="post")(scaled)
    model = keras.Model(x, post)
    model.save(folder / "model.keras")
    (repository / name / "config.yaml").write_text(yaml.safe_dump(
        {"code": ["layers.py", "blocks/"]}))
    return model, folder


@pytest.fixture(scope="module")
def code_repository(tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, dict[str, keras.Model]]:
    repo = tmp_path_factory.mktemp("code_models")
    models = {name: write_code_model(repo, name, variant)[0]
              for name, variant in (("times", "times"), ("plus", "plus"))}
    return repo, models


def test_custom_layers_load_with_their_code_and_taps_cross_them(start_process,
                                                                code_repository) -> None:
    repo, models = code_repository
    server = start_process(repo, "--allow-model-code")
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    with server.client() as client:
        for name, model in models.items():
            taps = {layer: keras.Model(model.input, model.get_layer(layer).output)
                    for layer in ("pre", "scaled", "post")}
            got = infer(client, name, {"x": x}, outputs=["pre", "scaled", "post"])
            for layer, sub in taps.items():
                np.testing.assert_allclose(got.as_numpy(layer), np.asarray(sub(x)), atol=1e-5)
        # The two registrations of "Tapserve>Scale" did not meet.
        pre = infer(client, "times", {"x": x}, outputs=["pre", "scaled"])
        np.testing.assert_allclose(pre.as_numpy("scaled"), 2 * pre.as_numpy("pre"), atol=1e-5)
        pre = infer(client, "plus", {"x": x}, outputs=["pre", "scaled"])
        np.testing.assert_allclose(pre.as_numpy("scaled"), pre.as_numpy("pre") + 2, atol=1e-5)
    assert "registering Tapserve>Scale" in server.output()


@frontend_only
def test_model_code_is_refused_without_the_flag(start_process, code_repository) -> None:
    repo, _ = code_repository
    server = start_process(repo, "--no-strict-readiness")
    with server.client() as client:
        assert not client.is_model_ready("times")
        with pytest.raises(InferenceServerException, match="--allow-model-code") as err:
            infer(client, "times", {"x": np.ones((1, 4), np.float32)})
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        rows = client.get_model_repository_index(as_json=True)["models"]
        assert all("--allow-model-code" in r["reason"] for r in rows), rows
    # Strict readiness (the default): a model that cannot serve keeps the server unready.
    strict = start_process(repo, ready=False)
    with strict.client() as client:
        until(lambda: "start-up load done" in strict.output(), timeout=60)
        assert not client.is_server_ready()
