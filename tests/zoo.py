"""Small deterministic Keras models that exercise every shape of graph Tapserve must serve.

Each ``build_<name>()`` seeds Keras itself, so two calls give the same weights. ``save()``
writes the model-repository layout of SPEC.md (``<dir>/1/model.keras`` or ``model.h5``);
``write_model()`` also writes the model's ``config.yaml`` from ``CONFIGS``.

Names worth knowing (all layers are named explicitly unless said otherwise):

- ``sequential``: its InputLayer is auto-named by Keras: ``input_layer`` in a fresh process,
  ``input_layer_<n>`` after other auto-named inputs (the counter is process-global). The
  saved file keeps whatever name it got, so read it from the model, never hard-code it.
- ``siamese``: ``keras.ops.abs`` is an ``Operation`` (not a layer) auto-named ``absolute``
  or ``absolute_<n>`` (same process-global counter), listed in ``model.operations`` but
  not in ``model.layers``.
- ``two_heads``: dict output keys (``label``, ``score``) differ on purpose from the head
  layers' names (``label_head``, ``score_head``); ``model.output_names`` gives the latter.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import numpy as np
import yaml

SEED = 1234
VOCAB = ["red", "green", "blue", "cyan", "magenta"]  # string_input's lookup vocabulary
TOKEN_VOCAB_SIZE = 50  # multi_dtype's Embedding input_dim: tokens must be in [0, 50)

L = keras.layers


def build_autoencoder() -> keras.Model:
    """image (8,8,1) -> conv encoder -> "code" (4) -> dense decoder -> "recon" (8,8,1)."""
    keras.utils.set_random_seed(SEED)
    image = keras.Input(shape=(8, 8, 1), name="image")
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="enc_conv")(image)
    h = L.Flatten(name="enc_flat")(h)
    h = L.Dense(16, activation="relu", name="enc_dense")(h)
    code = L.Dense(4, name="code")(h)
    h = L.Dense(16, activation="relu", name="dec_dense")(code)
    h = L.Dense(64, name="dec_pixels")(h)
    h = L.Reshape((8, 8, 1), name="dec_reshape")(h)
    recon = L.Conv2D(1, 3, padding="same", activation="sigmoid", name="recon")(h)
    return keras.Model(image, recon, name="autoencoder")


def build_two_heads() -> keras.Model:
    """x (16,) -> two branches -> "merged" -> dict outputs {"label", "score"}."""
    keras.utils.set_random_seed(SEED)
    x = keras.Input(shape=(16,), name="x")
    a = L.Dense(8, activation="relu", name="a_hidden")(x)
    a = L.Dense(4, activation="relu", name="branch_a")(a)
    b = L.Dense(8, activation="tanh", name="b_hidden")(x)
    b = L.Dense(4, activation="tanh", name="branch_b")(b)
    merged = L.Concatenate(name="merged")([a, b])
    label = L.Dense(3, activation="softmax", name="label_head")(merged)
    score = L.Dense(1, name="score_head")(merged)
    return keras.Model(x, {"label": label, "score": score}, name="two_heads")


def build_sequential() -> keras.Sequential:
    """Sequential built by add(), input given as input_shape on the first layer.

    Keras 3.15 still accepts ``input_shape=`` on the first layer of a Sequential (with a
    UserWarning: "Do not pass an input_shape ... prefer an Input(shape) object"); the model
    is built at once and gets an auto-named InputLayer, which is the case worth testing.
    """
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(name="sequential")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Do not pass an `input_shape`")
        model.add(L.Dense(8, activation="relu", input_shape=(10,), name="dense_1"))
    model.add(L.Dense(8, activation="relu", name="dense_2"))
    model.add(L.Dense(2, name="out"))
    return model


def build_siamese() -> keras.Model:
    """left, right (12,) -> one "shared" Dense called twice -> |diff| -> "similarity"."""
    keras.utils.set_random_seed(SEED)
    left = keras.Input(shape=(12,), name="left")
    right = keras.Input(shape=(12,), name="right")
    shared = L.Dense(8, activation="relu", name="shared")
    diff = L.Subtract(name="diff")([shared(left), shared(right)])
    # A bare keras.ops call, not a layer: real models do this, and it becomes an
    # Operation node ("absolute[_<n>]") that graph surgery must replay like any layer.
    distance = keras.ops.abs(diff)
    similarity = L.Dense(1, activation="sigmoid", name="similarity")(distance)
    return keras.Model([left, right], similarity, name="siamese")


def build_nested() -> keras.Model:
    """x -> "stem" -> Sequential "backbone" [b1, b2, functional "block" [inner, inner_proj]]
    -> "logits". Taps such as ``backbone/b1`` and ``backbone/block/inner`` reach depth 2."""
    keras.utils.set_random_seed(SEED)
    block_in = keras.Input(shape=(8,), name="block_in")
    inner = L.Dense(8, activation="relu", name="inner")(block_in)
    block = keras.Model(block_in, L.Dense(6, name="inner_proj")(inner), name="block")
    # Explicit named Input so the nested Sequential is built with a stable input name.
    backbone = keras.Sequential(
        [
            keras.Input(shape=(8,), name="backbone_in"),
            L.Dense(8, activation="relu", name="b1"),
            L.Dense(8, activation="relu", name="b2"),
            block,
        ],
        name="backbone",
    )
    x = keras.Input(shape=(10,), name="x")
    h = L.Dense(8, activation="relu", name="stem")(x)
    logits = L.Dense(3, name="logits")(backbone(h))
    return keras.Model(x, logits, name="nested")


def build_multi_dtype() -> keras.Model:
    """tokens int64 (6,) and features float32 (3,) -> list outputs ["cls", "reg"]."""
    keras.utils.set_random_seed(SEED)
    tokens = keras.Input(shape=(6,), dtype="int64", name="tokens")
    features = keras.Input(shape=(3,), dtype="float32", name="features")
    t = L.Embedding(TOKEN_VOCAB_SIZE, 8, name="embed")(tokens)
    t = L.GlobalAveragePooling1D(name="pool")(t)
    f = L.Dense(8, activation="relu", name="feat_dense")(features)
    h = L.Concatenate(name="concat")([t, f])
    cls = L.Dense(2, activation="softmax", name="cls")(h)
    reg = L.Dense(1, name="reg")(h)
    return keras.Model([tokens, features], [cls, reg], name="multi_dtype")


def build_legacy_h5() -> keras.Model:
    """inp (5,) -> "hidden" -> "out"; meant for save(..., fmt="h5")."""
    keras.utils.set_random_seed(SEED)
    inp = keras.Input(shape=(5,), name="inp")
    hidden = L.Dense(4, activation="relu", name="hidden")(inp)
    return keras.Model(inp, L.Dense(2, name="out")(hidden), name="legacy_h5")


def build_string_input() -> keras.Model:
    """text: string, shape () (one string per row) -> "lookup" -> "embed" -> "out".

    Shape () works in Keras 3.15: the model saves as .keras, reloads, and takes a
    ``tf.constant([b"red", ...])`` of shape (batch,), so no (1,) wrapper is needed.
    Out-of-vocabulary strings map to index 0 (StringLookup's default OOV bucket).
    """
    keras.utils.set_random_seed(SEED)
    text = keras.Input(shape=(), dtype="string", name="text")
    ids = L.StringLookup(vocabulary=VOCAB, name="lookup")(text)
    h = L.Embedding(len(VOCAB) + 1, 4, name="embed")(ids)
    return keras.Model(text, L.Dense(2, name="out")(h), name="string_input")


def build_lambda_layer() -> keras.Model:
    """x (4,) -> "pre" -> Lambda "double" (t * 2) -> "out". Loads only with safe_mode=False."""
    keras.utils.set_random_seed(SEED)
    x = keras.Input(shape=(4,), name="x")
    pre = L.Dense(4, name="pre")(x)
    doubled = L.Lambda(lambda t: t * 2.0, name="double")(pre)
    return keras.Model(x, L.Dense(1, name="out")(doubled), name="lambda_layer")


ZOO: dict[str, Callable[[], keras.Model]] = {
    "autoencoder": build_autoencoder,
    "two_heads": build_two_heads,
    "sequential": build_sequential,
    "siamese": build_siamese,
    "nested": build_nested,
    "multi_dtype": build_multi_dtype,
    "legacy_h5": build_legacy_h5,
    "string_input": build_string_input,
    "lambda_layer": build_lambda_layer,
}

# The format each model is meant to be saved in (default "keras").
FORMATS: dict[str, str] = {"legacy_h5": "h5"}

# Models that only load with keras.models.load_model(..., safe_mode=False).
UNSAFE: frozenset[str] = frozenset({"lambda_layer"})

# config.yaml contents (SPEC.md) for the models that need endpoints beyond their own.
CONFIGS: dict[str, dict[str, Any]] = {
    "autoencoder": {
        "endpoints": {
            "autoencoder": {"inputs": ["image"], "outputs": ["recon"]},
            "encoder": {"inputs": ["image"], "outputs": ["code"]},
            "decoder": {"inputs": ["code"], "outputs": ["recon"]},
        },
        "default_endpoint": "autoencoder",
        # Small on purpose: a test can send a bigger batch and see it split, not refused.
        "batching": {"max_batch_size": 8, "max_queue_delay_ms": 2},
    },
    "two_heads": {
        "endpoints": {
            "full": {"inputs": ["x"], "outputs": ["label", "score"]},
            "branches": {"inputs": ["x"], "outputs": ["branch_a", "branch_b"]},
            "head": {"inputs": ["merged"], "outputs": ["label"]},
        },
        "default_endpoint": "full",
    },
    "siamese": {
        "endpoints": {
            "similarity": {"inputs": ["left", "right"], "outputs": ["similarity"]},
            # Same layer, k-th call: each side's embedding from its own input.
            "embed_left": {"inputs": ["left"], "outputs": ["shared:0"]},
            "embed_right": {"inputs": ["right"], "outputs": ["shared:1"]},
        },
        "default_endpoint": "similarity",
    },
    "nested": {
        "endpoints": {
            "logits": {"inputs": ["x"], "outputs": ["logits"]},
            "inner": {"inputs": ["x"], "outputs": ["backbone/block/inner"]},
            # Cut inside the nested Sequential: a new input replaces b1's output.
            "from_b1": {"inputs": ["backbone/b1"], "outputs": ["logits"]},
        },
        "default_endpoint": "logits",
    },
    "multi_dtype": {
        "endpoints": {
            "both": {"inputs": ["tokens", "features"], "outputs": ["cls", "reg"]},
            # Same inputs as "both": requests to the two can share one forward pass.
            "cls": {"inputs": ["tokens", "features"], "outputs": ["cls"]},
        },
        "default_endpoint": "both",
    },
}


def save(model: keras.Model, directory: Path, fmt: str = "keras") -> Path:
    """Write ``<directory>/1/model.keras`` (or ``model.h5`` for fmt="h5"); return its path."""
    if fmt not in ("keras", "h5"):
        raise ValueError(f"fmt must be 'keras' or 'h5', not {fmt!r}")
    path = Path(directory) / "1" / f"model.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keras 3 picks the format from the suffix: ".h5" is the legacy HDF5 writer.
    model.save(path)
    return path


def write_model(name: str, repository: Path, with_config: bool = True, *,
                folder: str | None = None, config: dict[str, Any] | str | None = None) -> Path:
    """Build zoo model ``name`` into ``<repository>/<folder or name>/``: its model file and
    a config.yaml, `config` (a dict, or YAML text) if given, else the zoo's own for `name`
    if it has one and `with_config`; return the model file's path. One model under many
    folders (a slow queue, a small one) is how tests keep their metrics apart."""
    model_dir = Path(repository) / (folder or name)
    path = save(ZOO[name](), model_dir, FORMATS.get(name, "keras"))
    if config is None and with_config:
        config = CONFIGS.get(name)
    if config is not None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        (model_dir / "config.yaml").write_text(text)
    return path


def input_names(model: keras.Model) -> list[str]:
    """The model's input names (its InputLayers' names), in input order."""
    return [t._keras_history.operation.name for t in model.inputs]


def sample_inputs(model: keras.Model, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid inputs keyed by input name, as a client would send them.

    Strings come back as a numpy object array of bytes (what BYTES tensors decode to),
    with one out-of-vocabulary word so the OOV path is exercised.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, t in zip(input_names(model), model.inputs, strict=True):
        shape = (batch, *t.shape[1:])
        if t.dtype == "string":
            words = [w.encode() for w in [*VOCAB, "unknown"]]
            out[name] = np.array(rng.choice(words, size=shape), dtype=object)
        elif "int" in t.dtype:
            out[name] = rng.integers(0, TOKEN_VOCAB_SIZE, size=shape).astype(t.dtype)
        else:
            out[name] = rng.random(shape, dtype=np.float32).astype(t.dtype)
    return out


EXAMPLES_SCRIPT = Path(__file__).resolve().parent.parent / "models" / "build_examples.py"


def import_script(path: Path, name: str) -> ModuleType:
    """A script the repository keeps outside any package (models/ is a model repository,
    examples/ a folder of scripts), imported by path as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_examples(repository: Path) -> list[Path]:
    """The example models of models/build_examples.py (trained on sklearn's digits) into
    `repository`."""
    module = import_script(EXAMPLES_SCRIPT, "build_examples")
    return module.build_all(repository)
