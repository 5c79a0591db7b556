"""Build the example models of models/ from scikit-learn's bundled 8x8 digits (no download).

    python models/build_examples.py [--models-dir models] [--force]

Builds only the models whose ``1/model.keras`` is missing, unless --force. The trained
files are not committed (.gitignore); each model's config.yaml is, next to this script,
and is copied into another --models-dir that lacks one.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Built on the backend the server will run (a JAX-only venv has no TensorFlow to build on).
os.environ.setdefault("KERAS_BACKEND", os.environ.get("TAPSERVE_BACKEND", "tensorflow"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

log = logging.getLogger("build_examples")

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 30
BATCH_SIZE = 32

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def load_digits_split() -> Split:
    """(x_train, x_test, y_train, y_test): images (n, 8, 8, 1) float32 in [0, 1], labels
    int64; the same stratified 80/20 split every time, so tests can score held-out data."""
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., np.newaxis]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype("int64"), test_size=0.2, random_state=SEED,
        stratify=digits.target,
    )
    return x_train, x_test, y_train, y_test


def _decoder(code: keras.KerasTensor, prefix: str) -> keras.KerasTensor:
    h = keras.layers.Dense(32, activation="relu", name=f"{prefix}_dense")(code)
    h = keras.layers.Dense(64, activation="sigmoid", name=f"{prefix}_pixels")(h)
    return keras.layers.Reshape((8, 8, 1), name="recon")(h)


def build_autoencoder(data: Split) -> tuple[keras.Model, str]:
    """image (8,8,1) -> conv encoder -> "code" (8) -> decoder -> "recon" (8,8,1)."""
    x_train, x_test, _, _ = data
    image = keras.Input(shape=(8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="enc_conv")(image)
    h = keras.layers.Flatten(name="enc_flat")(h)
    h = keras.layers.Dense(32, activation="relu", name="enc_dense")(h)
    code = keras.layers.Dense(8, name="code")(h)
    model = keras.Model(image, _decoder(code, "dec"), name="digits_autoencoder")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    history = model.fit(x_train, x_train, epochs=EPOCHS, batch_size=BATCH_SIZE, verbose=0)
    test_mse = model.evaluate(x_test, x_test, verbose=0)
    return model, f"loss {history.history['loss'][-1]:.4f}, test mse {test_mse:.4f}"


def build_classifier(data: Split) -> tuple[keras.Model, str]:
    """image -> "conv" (8x8x8) -> trunk with "features" (32) -> {"digit": softmax 10,
    "recon": (8,8,1)}. The conv layer is what the `cam` endpoint's Grad-CAM weighs."""
    x_train, x_test, y_train, y_test = data
    image = keras.Input(shape=(8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(image)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(64, activation="relu", name="trunk")(h)
    features = keras.layers.Dense(32, activation="relu", name="features")(h)
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(features)
    outputs = {"digit": digit, "recon": _decoder(features, "dec")}
    model = keras.Model(image, outputs, name="digits_classifier")
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss={"digit": "sparse_categorical_crossentropy", "recon": "mse"},
        # The reconstruction is a side task: weight it so it does not drown the labels.
        loss_weights={"digit": 1.0, "recon": 0.5},
    )
    targets = {"digit": y_train, "recon": x_train}
    history = model.fit(x_train, targets, epochs=EPOCHS, batch_size=BATCH_SIZE, verbose=0)
    accuracy = float(np.mean(np.asarray(model(x_test)["digit"]).argmax(-1) == y_test))
    return model, f"loss {history.history['loss'][-1]:.4f}, test accuracy {accuracy:.3f}"


BUILDERS: dict[str, Callable[[Split], tuple[keras.Model, str]]] = {
    "digits_autoencoder": build_autoencoder,
    "digits_classifier": build_classifier,
}


def build_all(models_dir: Path, force: bool = False) -> list[Path]:
    """Train and save every example model missing under ``models_dir``; return the paths
    of the model files written (empty when all were there and not ``force``)."""
    models_dir = Path(models_dir)
    written: list[Path] = []
    data: Split | None = None
    for name, builder in BUILDERS.items():
        path = models_dir / name / "1" / "model.keras"
        if path.exists() and not force:
            log.info("%s: %s exists, skipped (--force rebuilds)", name, path)
            continue
        data = data if data is not None else load_digits_split()
        log.info("%s: training %d epochs", name, EPOCHS)
        start = time.perf_counter()
        keras.utils.set_random_seed(SEED)
        model, metrics = builder(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        config, committed = path.parent.parent / "config.yaml", HERE / name / "config.yaml"
        if not config.exists() and committed.exists():
            shutil.copyfile(committed, config)
        log.info("%s: %d epochs, %s, saved %s in %.1fs",
                 name, EPOCHS, metrics, path, time.perf_counter() - start)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=HERE,
                        help="model repository to build into (default: this folder)")
    parser.add_argument("--force", action="store_true", help="rebuild models that exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    written = build_all(args.models_dir, args.force)
    log.info("built %d model(s) in %.1fs", len(written), time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
