"""models/build_examples.py: the example models train well enough to be worth serving."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import keras
import numpy as np
import pytest
import yaml
import zoo

SCRIPT = Path(__file__).resolve().parent.parent / "models" / "build_examples.py"


def _load_script() -> ModuleType:
    # models/ is a model repository, not a package: the script is imported by path.
    return zoo.import_script(SCRIPT, "build_examples")


build_examples = _load_script()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    models_dir = tmp_path_factory.mktemp("models")
    return models_dir, build_examples.build_all(models_dir)


def test_builds_both_models_with_their_configs(built: tuple[Path, list[Path]]) -> None:
    models_dir, written = built
    assert written == [
        models_dir / "digits_autoencoder" / "1" / "model.keras",
        models_dir / "digits_classifier" / "1" / "model.keras",
    ]
    for name in ("digits_autoencoder", "digits_classifier"):
        copied = yaml.safe_load((models_dir / name / "config.yaml").read_text())
        assert copied == yaml.safe_load((SCRIPT.parent / name / "config.yaml").read_text())


def test_skips_what_exists_unless_forced(built: tuple[Path, list[Path]]) -> None:
    models_dir, _ = built
    assert build_examples.build_all(models_dir) == []


def test_classifier_accuracy_on_held_out_digits(built: tuple[Path, list[Path]]) -> None:
    models_dir, _ = built
    model = keras.models.load_model(models_dir / "digits_classifier" / "1" / "model.keras")
    _, x_test, _, y_test = build_examples.load_digits_split()
    out = model(x_test)
    assert set(out) == {"digit", "recon"}
    assert out["recon"].shape == x_test.shape
    accuracy = np.mean(np.asarray(out["digit"]).argmax(-1) == y_test)
    assert accuracy > 0.85
    for layer in ("conv", "features", "digit", "recon"):
        model.get_layer(layer)  # config.yaml's endpoints name these


def test_autoencoder_beats_the_mean_image(built: tuple[Path, list[Path]]) -> None:
    models_dir, _ = built
    model = keras.models.load_model(models_dir / "digits_autoencoder" / "1" / "model.keras")
    x_train, x_test, _, _ = build_examples.load_digits_split()
    mse = np.mean((np.asarray(model(x_test)) - x_test) ** 2)
    baseline = np.mean((x_train.mean(axis=0) - x_test) ** 2)
    assert mse < 0.5 * baseline, (mse, baseline)
    assert model.get_layer("code").output.shape == (None, 8)
    assert [t._keras_history.operation.name for t in model.inputs] == ["image"]
