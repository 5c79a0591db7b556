"""What an explanation costs against a forward pass of the same rows, in-process.

    .venv/bin/python bench/explain.py [--rows 1 8 32] [--steps 32] [--repeats 30]

The server's own compute path (KerasRuntime on one CPU thread, as a batch runs), no
network: a small conv classifier on 28x28x1 (conv 16 -> conv 32 stride 2 -> dense 64 ->
softmax 10), batches of `--rows` rows. The kinds run interleaved, round after round, so
a noisy machine slows them alike; each kind's fastest and median time per batch, and the
ratio of its fastest to the forward pass's fastest. Integrated gradients runs rows x steps
scaled rows (max_batch_size is set high enough for one chunk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from service.config import ExplainConfig  # noqa: E402
from service.explain import check  # noqa: E402
from service.graph import TapGraph  # noqa: E402
from service.runtime_tf import KerasRuntime  # noqa: E402
from service.types import Batch  # noqa: E402


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    image = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(image)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu",
                            name="conv2")(h)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(h))
    h = keras.layers.Dense(64, activation="relu", name="dense")(h)
    label = keras.layers.Dense(10, activation="softmax", name="label")(h)
    return keras.Model(image, label, name="bench_cnn")


def timed(runtime: KerasRuntime, batches: dict[str, Batch], repeats: int
          ) -> dict[str, list[float]]:
    """Seconds of each batch on the compute path, `repeats` interleaved rounds (after one
    warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in batches}
    for batch in batches.values():
        runtime._on_device("/CPU:0", batch)
    for _ in range(repeats):
        for name, batch in batches.items():
            start = time.perf_counter()
            runtime._on_device("/CPU:0", batch)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    graph = TapGraph(build())
    runtime = KerasRuntime(graph, ["/CPU:0"], 1, max_batch_size=max(args.rows) * args.steps)
    kinds = {
        "gradient": ExplainConfig(explain="gradient", output="label"),
        "gradcam": ExplainConfig(explain="gradcam", output="label", layer="conv2"),
        f"integrated_gradients ({args.steps} steps)": ExplainConfig(
            explain="integrated_gradients", output="label", steps=args.steps),
    }
    explanations = {name: check(graph, "bench", name, c)[0] for name, c in kinds.items()}
    print("| rows | kind | fastest ms | median ms | x forward (fastest) |")
    print("| --- | --- | --- | --- | --- |")
    for rows in args.rows:
        x = np.random.default_rng(rows).random((rows, 28, 28, 1), dtype=np.float32)
        feeds = {"image": x, "target": np.full(rows, -1, np.int64)}
        batches = {"forward": Batch(("image",), ("label",), {"image": x}, None)} | {
            name: Batch(e, ("attribution",), feeds, None) for name, e in explanations.items()}
        times = timed(runtime, batches, args.repeats)
        forward = min(times["forward"])
        for name, seconds in times.items():
            print(f"| {rows} | {name} | {min(seconds) * 1e3:.2f} | "
                  f"{statistics.median(seconds) * 1e3:.2f} | {min(seconds) / forward:.1f} |")
    runtime.close()


if __name__ == "__main__":
    main()
