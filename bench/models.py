"""Build the bench models (random weights, fixed seeds) and their model repositories.

    .venv/bin/python bench/models.py --out bench/out/models

Writes one repository per server run, each `<repo>/<model>/config.yaml` +
`<repo>/<model>/1/model.keras`:

- `s1/ae28`: a conv autoencoder on 28x28x1 (scenario 1).
- `s2/dense64`: a 64 -> 64 dense model (scenario 2; the peers serve the same file).
- `s3_shared/trunk3`, `s3_separate/trunk3`: one conv trunk, three heads (a classifier, a
  light embedding, a heavy decoder) as three endpoints with the same input; the two
  repositories differ only in `batching.shared_passes` (scenario 3);
  `s3_shared_nodedup/trunk3`: shared passes with `dedup_rows: false`, to check that
  looking for identical rows costs nothing measurable when there are none.
- `s4_dedup/fanout3`, `s4_shared/fanout3`, `s4_separate/fanout3`,
  `s4_separate_dedup/fanout3`: four conv layers shared by three light heads (a
  classifier, an embedding, attributes) as three endpoints with the same input; the
  repositories differ in `shared_passes` and `dedup_rows` (scenario 4: each image is
  sent to all three endpoints at once).

Run in its own process by bench/run.py, so the orchestrator never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import yaml  # noqa: E402

SEED = 1234


def autoencoder() -> keras.Model:
    """image (28,28,1) -> strided convs -> "code" (16) -> transposed convs -> "recon"."""
    image = keras.Input(shape=(28, 28, 1), name="image")
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu",
                            name="enc_conv1")(image)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu",
                            name="enc_conv2")(h)
    h = keras.layers.Flatten(name="enc_flat")(h)
    code = keras.layers.Dense(16, name="code")(h)
    h = keras.layers.Dense(7 * 7 * 32, activation="relu", name="dec_dense")(code)
    h = keras.layers.Reshape((7, 7, 32), name="dec_reshape")(h)
    h = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu",
                                     name="dec_deconv1")(h)
    h = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu",
                                     name="dec_deconv2")(h)
    recon = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="recon")(h)
    return keras.Model(image, recon, name="ae28")


def dense64() -> keras.Model:
    """x (64) -> Dense 64 relu -> Dense 64 "y"."""
    x = keras.Input(shape=(64,), name="x")
    h = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    y = keras.layers.Dense(64, name="y")(h)
    return keras.Model(x, y, name="dense64")


def trunk3() -> keras.Model:
    """image -> shared conv trunk -> {"label": classifier, "embedding": light head,
    "recon": heavy transposed-conv decoder}."""
    image = keras.Input(shape=(28, 28, 1), name="image")
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="trunk_conv1")(image)
    h = keras.layers.MaxPooling2D(name="trunk_pool1")(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="trunk_conv2")(h)
    trunk = keras.layers.MaxPooling2D(name="trunk")(h)  # (7, 7, 64)
    g = keras.layers.GlobalAveragePooling2D(name="cls_pool")(trunk)
    label = keras.layers.Dense(10, activation="softmax", name="label")(g)
    e = keras.layers.Flatten(name="emb_flat")(trunk)
    e = keras.layers.Dense(32, name="emb_dense")(e)
    embedding = keras.layers.UnitNormalization(name="embedding")(e)
    d = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu",
                                     name="dec_deconv1")(trunk)
    d = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu",
                                     name="dec_deconv2")(d)
    recon = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="recon")(d)
    return keras.Model(image, {"label": label, "embedding": embedding, "recon": recon},
                       name="trunk3")


def fanout3() -> keras.Model:
    """image -> four conv layers (nearly all the arithmetic) -> {"label", "embedding",
    "attributes"}: three heads of one Dense layer or two on the pooled trunk."""
    image = keras.Input(shape=(28, 28, 1), name="image")
    h = image
    for i, (filters, pool) in enumerate(((64, False), (64, True), (128, False), (128, True))):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"trunk_conv{i + 1}")(h)
        if pool:
            h = keras.layers.MaxPooling2D(name=f"trunk_pool{i + 1}")(h)
    trunk = keras.layers.GlobalAveragePooling2D(name="trunk")(h)  # (128,)
    label = keras.layers.Dense(10, activation="softmax", name="label")(trunk)
    e = keras.layers.Dense(32, name="emb_dense")(trunk)
    embedding = keras.layers.UnitNormalization(name="embedding")(e)
    attributes = keras.layers.Dense(8, activation="sigmoid", name="attributes")(trunk)
    return keras.Model(image, {"label": label, "embedding": embedding,
                               "attributes": attributes}, name="fanout3")


def _write(repo: Path, name: str, model: keras.Model, config: dict) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    path = folder / "1" / "model.keras"
    model.save(path)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build(out: Path, s1_batch: int, s2_batch: int, s3_batch: int, delay_ms: float) -> dict:
    """Write every repository; return what run.py needs to know about each model."""
    keras.utils.set_random_seed(SEED)
    ae, dense, trunk, fan = autoencoder(), dense64(), trunk3(), fanout3()
    batching = {"max_queue_delay_ms": delay_ms}
    paths = {
        "ae28": _write(out / "s1", "ae28", ae, {
            "batching": {"max_batch_size": s1_batch, **batching}}),
        "dense64": _write(out / "s2", "dense64", dense, {
            "batching": {"max_batch_size": s2_batch, **batching}}),
    }
    endpoints = {"classify": {"inputs": ["image"], "outputs": ["label"]},
                 "embed": {"inputs": ["image"], "outputs": ["embedding"]},
                 "decode": {"inputs": ["image"], "outputs": ["recon"]}}
    for repo, shared, dedup in (("s3_shared", True, True), ("s3_separate", False, True),
                                ("s3_shared_nodedup", True, False)):
        paths[f"trunk3_{repo}"] = _write(out / repo, "trunk3", trunk, {
            "endpoints": endpoints, "default_endpoint": "classify",
            "batching": {"max_batch_size": s3_batch, **batching, "shared_passes": shared,
                         "dedup_rows": dedup}})
    heads = {"classify": {"inputs": ["image"], "outputs": ["label"]},
             "embed": {"inputs": ["image"], "outputs": ["embedding"]},
             "attributes": {"inputs": ["image"], "outputs": ["attributes"]}}
    for repo, shared, dedup in (("s4_dedup", True, True), ("s4_shared", True, False),
                                ("s4_separate", False, False),
                                ("s4_separate_dedup", False, True)):
        paths[f"fanout3_{repo}"] = _write(out / repo, "fanout3", fan, {
            "endpoints": heads, "default_endpoint": "classify",
            "batching": {"max_batch_size": s3_batch, **batching, "shared_passes": shared,
                         "dedup_rows": dedup}})
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "params": {"ae28": ae.count_params(), "dense64": dense.count_params(),
                   "trunk3": trunk.count_params(), "fanout3": fan.count_params()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--s1-batch", type=int, default=64)
    parser.add_argument("--s2-batch", type=int, default=32)
    parser.add_argument("--s3-batch", type=int, default=64)  # as bench/run.py (and s4)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    args = parser.parse_args()
    info = build(args.out, args.s1_batch, args.s2_batch, args.s3_batch, args.delay_ms)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
