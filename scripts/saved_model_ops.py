"""Regenerate service/allowed_ops.py: the ops ordinary SavedModels run.

Exports the test zoo's models and one small model per common Keras layer (and keras.ops
function), each with Keras 3 `model.export` and with `tf.saved_model.save`, and collects
the ops loading and serving them would run (service/savedmodel_ops.py). An op whose
name says it touches files or runs Python is never listed, whatever exported it.

    PYTHONPATH=.:tests python scripts/saved_model_ops.py   # writes service/allowed_ops.py
"""

from __future__ import annotations

import re
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import zoo
from keras import layers as L  # noqa: N812
from keras import ops as K  # noqa: N812

from service.savedmodel_ops import RESTORE_OPS, used_ops

OUT = Path(__file__).resolve().parent.parent / "service" / "allowed_ops.py"
# Never allowed, whatever uses it: files, datasets, checkpoints, summaries, Python, printing.
RISKY = re.compile(r"File|Reader|Writer|Dataset|Iterator|Save|Restore|Checkpoint|Summary|"
                   r"PyFunc|Print|Record|Csv|CSV|Cache|Load|Immutable|Matching|Sleep|Socket")
# Ops the exports above do not happen to use, each pure computation on its inputs (it
# reads, writes and lists nothing): the same layers on a GPU (cuDNN's recurrent kernels),
# tf.keras 2 exports (fused batch norm, TF1 control flow) and common math and array ops.
PURE_OPS = {
    "CudnnRNN", "CudnnRNNV2", "CudnnRNNV3", "CudnnRNNParamsSize", "CudnnRNNCanonicalToParams",
    "CudnnRNNCanonicalToParamsV2", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
    "If", "StatelessIf", "StatelessWhile", "Switch", "Merge", "Enter", "Exit", "NextIteration",
    "LoopCond", "Select", "Min", "All", "Ceil", "FloorDiv", "FloorMod", "Mod", "Tan", "Atan",
    "Atan2", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Slice", "Unpack",
    "SplitV", "MirrorPad", "PadV2", "BatchMatMul", "BatchMatMulV3", "LogicalOr", "LogicalNot",
    "GreaterEqual", "Gather", "GatherNd", "ScatterNd", "Where", "Cumprod", "Rank",
    "BroadcastTo", "BroadcastArgs", "OnesLike", "ClipByValue", "AddN", "Add", "Div",
    "TruncateDiv", "Rint", "SegmentSum", "UnsortedSegmentSum", "ResizeBicubic",
    "CropAndResize", "DepthToSpace", "SpaceToDepth", "MaxPoolV2", "LRN", "MatrixBandPart",
    "MatrixDiagV3", "MatrixSetDiagV3", "InvertPermutation", "LinSpace", "EnsureShape",
    "CheckNumerics", "Assert", "Snapshot", "PlaceholderWithDefault", "VarIsInitializedOp",
    "StringJoin", "StringLength", "Substr", "RegexReplace", "StringStrip", "StringToNumber",
    "Selu", "Elu", "Softplus", "L2Loss", "Sum", "Complex", "Real", "Imag", "ComplexAbs",
}


def on(shape: tuple[int, ...], *make: Callable[[keras.KerasTensor], keras.KerasTensor],
       dtype: str = "float32") -> keras.Model:
    """A model applying each of `make` to one input of `shape`."""
    x = keras.Input(shape, dtype=dtype)
    return keras.Model(x, [f(x) for f in make])


def layer_zoo() -> dict[str, Callable[[], keras.Model]]:
    seq, img, vol = (6, 4), (8, 8, 3), (4, 4, 4, 2)
    acts = ["relu", "gelu", "selu", "elu", "softplus", "softsign", "swish", "hard_sigmoid",
            "hard_swish", "mish", "log_softmax", "tanh", "sigmoid", "exponential",
            "leaky_relu", "relu6", "linear", "softmax", "celu", "glu", "hard_tanh",
            "log_sigmoid", "sparse_plus", "squareplus", "tanh_shrink",
            "soft_shrink", "hard_shrink", "sparsemax"]
    models: dict[str, Callable[[], keras.Model]] = {
        "dense": lambda: on((5,), L.Dense(3), L.EinsumDense("ab,bc->ac", 3)),
        "activations": lambda: on((4,), *(L.Activation(a) for a in acts),
                                  L.LeakyReLU(), L.PReLU(), L.ELU(), L.ReLU(6), L.Softmax()),
        "conv1d": lambda: on(seq, L.Conv1D(2, 3, padding="same"), L.Conv1DTranspose(2, 3),
                             L.SeparableConv1D(2, 3), L.DepthwiseConv1D(3),
                             L.Conv1D(2, 3, dilation_rate=2)),
        "conv2d": lambda: on(img, L.Conv2D(2, 3, strides=2), L.Conv2DTranspose(2, 3),
                             L.SeparableConv2D(2, 3), L.DepthwiseConv2D(3),
                             L.Conv2D(4, 3, dilation_rate=2)),
        "conv3d": lambda: on(vol, L.Conv3D(2, 2), L.Conv3DTranspose(2, 2)),
        "pooling": lambda: on(img, L.MaxPooling2D(2), L.AveragePooling2D(2),
                              L.GlobalMaxPooling2D(), L.GlobalAveragePooling2D()),
        "pooling1d3d": lambda: on(vol, L.MaxPooling3D(2), L.AveragePooling3D(2),
                                  L.GlobalAveragePooling3D(), L.GlobalMaxPooling3D()),
        "pooling1d": lambda: on(seq, L.MaxPooling1D(2), L.AveragePooling1D(2),
                                L.GlobalMaxPooling1D(), L.GlobalAveragePooling1D()),
        "norms": lambda: on(img, L.BatchNormalization(), L.LayerNormalization(),
                            L.GroupNormalization(groups=3), L.UnitNormalization(),
                            L.Dropout(0.5), L.SpatialDropout2D(0.5), L.GaussianNoise(0.1),
                            L.GaussianDropout(0.1), L.AlphaDropout(0.1),
                            L.ActivityRegularization()),
        "rms": lambda: on((4,), L.RMSNormalization()) if hasattr(L, "RMSNormalization")
        else on((4,), L.LayerNormalization(rms_scaling=True)),
        "shapes": lambda: on(img, L.Flatten(), L.Reshape((64, 3)), L.Permute((3, 1, 2)),
                             L.UpSampling2D(), L.ZeroPadding2D(), L.Cropping2D(1),
                             L.Resizing(4, 4), L.Resizing(4, 4, interpolation="nearest"),
                             L.CenterCrop(4, 4), L.Rescaling(1 / 255)),
        "shapes1d": lambda: on(seq, L.UpSampling1D(), L.ZeroPadding1D(), L.Cropping1D(1),
                               L.Flatten()),
        "repeat": lambda: on((4,), L.RepeatVector(3)),
        "shapes3d": lambda: on(vol, L.UpSampling3D(), L.ZeroPadding3D(), L.Cropping3D(1)),
        "recurrent": lambda: on(seq, L.LSTM(3), L.GRU(3), L.SimpleRNN(3),
                                L.LSTM(3, return_sequences=True), L.Bidirectional(L.GRU(2)),
                                L.GRU(3, reset_after=False), L.TimeDistributed(L.Dense(2))),
        "conv_lstm": lambda: on((3, 6, 6, 2), L.ConvLSTM2D(2, 3),
                                L.ConvLSTM2D(2, 3, return_sequences=True)),
        "conv_lstm1d": lambda: on((3, 6, 2), L.ConvLSTM1D(2, 3)),
        "attention": lambda: on(seq, lambda x: L.MultiHeadAttention(2, 4)(x, x),
                                lambda x: L.Attention()([x, x]),
                                lambda x: L.AdditiveAttention()([x, x]),
                                lambda x: L.GroupQueryAttention(4, 2, 2)(x, x)),
        "merge": lambda: on((4,), lambda x: L.Concatenate()([x, x]), lambda x: L.Add()([x, x]),
                            lambda x: L.Multiply()([x, x]), lambda x: L.Subtract()([x, x]),
                            lambda x: L.Average()([x, x]), lambda x: L.Maximum()([x, x]),
                            lambda x: L.Minimum()([x, x]), lambda x: L.Dot(1)([x, x])),
        "embedding": lambda: on((5,), L.Embedding(10, 3), dtype="int32"),
        "masked_rnn": lambda: on((5,), lambda x: L.LSTM(3)(L.Embedding(10, 3, mask_zero=True)(x)),
                                 lambda x: L.GRU(3)(L.Embedding(10, 3, mask_zero=True)(x)),
                                 dtype="int32"),
        "masking": lambda: on(seq, lambda x: L.SimpleRNN(2)(L.Masking()(x))),
        "lookup": lambda: on((3,), L.StringLookup(vocabulary=["a", "b"]),
                             L.StringLookup(vocabulary=["a", "b"], output_mode="one_hot"),
                             L.Hashing(8), dtype="string"),
        "int_lookup": lambda: on((3,), L.IntegerLookup(vocabulary=[1, 2]),
                                 L.CategoryEncoding(8, output_mode="multi_hot"), L.Hashing(8),
                                 dtype="int64"),
        "numeric_prep": lambda: on((3,), L.Normalization(mean=0.5, variance=2.0),
                                   L.Discretization(bin_boundaries=[0.0, 1.0])),
        "text": lambda: on((1,), L.TextVectorization(vocabulary=["a", "b"],
                                                     output_sequence_length=4),
                           L.TextVectorization(vocabulary=["a", "b"], output_mode="tf_idf",
                                               idf_weights=[1.0, 1.0]), dtype="string"),
        "ops_math": lambda: on((4,), K.abs, K.sqrt, K.exp, K.log1p, K.square, K.sign,
                               lambda x: K.clip(x, 0, 1), K.floor, K.round, K.cos, K.sin,
                               lambda x: K.power(x, 2.0), lambda x: K.where(x > 0, x, -x),
                               lambda x: K.maximum(x, 0.0), K.erf, K.logsumexp,
                               lambda x: K.cast(K.argmax(x, axis=-1), "float32"),
                               lambda x: K.cast(K.argmin(x, axis=-1), "float32"),
                               lambda x: K.top_k(x, 2)[0], lambda x: K.sort(x),
                               lambda x: K.cumsum(x, axis=-1), lambda x: K.norm(x, axis=-1),
                               lambda x: K.one_hot(K.cast(x, "int32"), 3),
                               lambda x: K.mean(x, axis=-1), lambda x: K.max(x, axis=-1),
                               lambda x: K.std(x, axis=-1), lambda x: K.prod(x, axis=-1),
                               lambda x: K.matmul(K.expand_dims(x, -1), K.expand_dims(x, 1)),
                               lambda x: K.einsum("bi,bj->bij", x, x),
                               lambda x: K.transpose(K.expand_dims(x, 1), (0, 2, 1)),
                               lambda x: K.tile(x, (1, 2)), lambda x: K.flip(x, axis=-1),
                               lambda x: K.normalize(x), lambda x: K.softmax(x),
                               lambda x: K.take(x, [0, 1], axis=-1),
                               lambda x: K.any(x > 0, axis=-1), K.isnan,
                               lambda x: K.nan_to_num(x), lambda x: K.tanh(x) / (x + 1e-3),
                               lambda x: K.argsort(x, axis=-1), lambda x: K.log(K.abs(x) + 1),
                               lambda x: K.reciprocal(x + 2), lambda x: K.rsqrt(K.abs(x) + 1)),
    }
    return models


def serving_models() -> dict[str, Callable[[], keras.Model]]:
    return {**{f"zoo_{n}": build for n, build in zoo.ZOO.items()}, **layer_zoo()}


def main() -> int:
    run: set[str] = set()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in serving_models().items():
            try:
                model = build()
                model(list(zoo.sample_inputs(model, batch=2).values())
                      if name.startswith("zoo_") else _sample(model))
                model.export(Path(tmp, name, "export"), verbose=False)
                tf.saved_model.save(model, str(Path(tmp, name, "save")))
            except Exception as exc:  # a layer this Keras lacks or cannot export: say so
                failed.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            for how in ("export", "save"):
                ops, restore = used_ops(Path(tmp, name, how))
                run |= ops | (restore - RESTORE_OPS)
            print(f"{name}: {len(run)} ops so far", file=sys.stderr)
    risky = sorted(op for op in run if RISKY.search(op))
    allowed = sorted((run | PURE_OPS) - set(risky))
    body = textwrap.fill(", ".join(f'"{op}"' for op in allowed), 92,
                         initial_indent="    ", subsequent_indent="    ")
    OUT.write_text(
        '"""The TensorFlow ops a SavedModel may run: those of ordinary Keras models (Keras 3\n'
        "`model.export` and `tf.saved_model.save` of the test zoo and of common layers).\n"
        'Generated by scripts/saved_model_ops.py; add an op there, not here."""\n\n'
        f"ALLOWED_OPS = frozenset({{\n{body},\n}})\n")
    print(f"{len(allowed)} ops written to {OUT}; left out as risky: {risky}")
    for line in failed:
        print("not exported:", line)
    return 0


def _sample(model: keras.Model) -> np.ndarray | list[np.ndarray]:
    """Two rows for each input of a layer-zoo model."""
    out = []
    for x in model.inputs:
        shape = (2, *x.shape[1:])
        if x.dtype == "string":
            out.append(np.full(shape, "a", dtype=object))
        elif "int" in x.dtype:
            out.append(np.ones(shape, dtype=x.dtype))
        else:
            out.append(np.random.default_rng(0).random(shape).astype(x.dtype))
    return out[0] if len(out) == 1 else out


if __name__ == "__main__":
    sys.exit(main())
