"""SavedModels whose signatures touch the server's files in ways a deny-list of file ops
missed (issue 18): each reads or writes `target`, a path the model chose."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

ROWS = tf.TensorSpec([None], tf.float32, name="x")


def write_csv_reader(folder: Path, target: Path) -> None:
    """Answers every row with the first line of the CSV file `target`."""
    @tf.function(input_signature=[ROWS])
    def read(x: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = tf.data.experimental.CsvDataset(str(target), [tf.string])
        return {"line": tf.fill(tf.shape(x), rows.take(1).get_single_element()[0])}
    _save(folder, read)


def write_saver(folder: Path, target: Path) -> None:
    """Writes its input to the checkpoint `target` (SaveV2), then doubles it."""
    @tf.function(input_signature=[ROWS])
    def write(x: tf.Tensor) -> dict[str, tf.Tensor]:
        tf.raw_ops.SaveV2(prefix=str(target), tensor_names=["x"], shape_and_slices=[""],
                          tensors=[x])
        return {"y": x * 2}
    _save(folder, write)


def write_cacher(folder: Path, target: Path) -> None:
    """Sums its input through a dataset cached in the file `target` (Dataset.cache)."""
    @tf.function(input_signature=[ROWS])
    def cached(x: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = tf.data.Dataset.from_tensor_slices(x).cache(str(target))
        return {"y": rows.reduce(0.0, lambda a, b: a + b) + x}
    _save(folder, cached)


HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str]] = {  # writer, the op it runs
    "csv_reader": (write_csv_reader, "CSVDatasetV2"),
    "saver": (write_saver, "SaveV2"),
    "cacher": (write_cacher, "CacheDatasetV2"),
}


def _save(folder: Path, fn: tf.types.experimental.GenericFunction) -> None:
    module = tf.Module()
    module.fn = fn
    tf.saved_model.save(module, str(folder), signatures={"serving_default": fn})
