"""The ceiling: the same Keras model called in-process, no server, no network.

    .venv/bin/python bench/inprocess.py --model M.keras --batch 64 --threads 2 \
        --duration 10 --out result.json

A fresh process with TensorFlow given the whole machine (bench/run.py passes intra-op
threads = CPUs / threads, inter-op = every CPU: no front end to leave room for), one
`tf.function` with an input signature whose batch dimension is None, called in a closed
loop by `--threads` threads (the server computes up to two batches at once on the CPU)
on numpy batches of `--batch` rows; outputs come back as numpy, as the server's do.
Reports rows/s and per-call latency.

`--backend jax`: the same on Keras's JAX backend, one `jax.jit` of the model's
`stateless_call` (weights passed in, as a server holds them), compiled once for the batch
size; XLA sizes its own CPU threads (the thread flags are TensorFlow's).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--inter-op-threads", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default="tensorflow")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend

    if args.backend == "tensorflow":  # before anything starts TensorFlow
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)

    import keras
    import numpy as np

    model = keras.models.load_model(args.model, compile=False)
    rng = np.random.default_rng(0)
    feeds = [rng.random((args.batch, *t.shape[1:])).astype(t.dtype) for t in model.inputs]
    call = jax_call(model, feeds) if args.backend == "jax" else tf_call(model, feeds)

    call()  # trace
    start = time.perf_counter() + args.warmup
    end = start + args.duration
    counts = [0] * args.threads
    latencies: list[list[float]] = [[] for _ in range(args.threads)]

    def loop(i: int) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            call()
            t1 = time.perf_counter()
            if t0 >= start and t1 <= end:
                counts[i] += 1
                latencies[i].append(t1 - t0)

    cpu0 = None
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(max(start - time.perf_counter(), 0))
    cpu0 = time.process_time()
    time.sleep(max(end - time.perf_counter(), 0))
    cpu1 = time.process_time()
    for t in threads:
        t.join()
    lat = np.array([x for per in latencies for x in per]) * 1000
    calls = sum(counts)
    result = {
        "model": args.model, "batch": args.batch, "threads": args.threads,
        "intra_op_threads": args.intra_op_threads, "inter_op_threads": args.inter_op_threads,
        "duration_s": args.duration, "calls": calls,
        "calls_per_s": calls / args.duration,
        "rows_per_s": calls * args.batch / args.duration,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "cpu_cores": (cpu1 - cpu0) / args.duration,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


def tf_call(model: Any, feeds: list) -> Callable[[], None]:
    """One call of the model as a `tf.function` with a None-batch signature, numpy out."""
    import numpy as np
    import tensorflow as tf

    signature = [tf.TensorSpec((None, *t.shape[1:]), t.dtype) for t in model.inputs]

    @tf.function(input_signature=signature)
    def run(*inputs: tf.Tensor) -> object:
        return model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)

    def call() -> None:
        for t in tf.nest.flatten(run(*feeds)):
            np.asarray(t)
    return call


def jax_call(model: Any, feeds: list) -> Callable[[], None]:
    """One call of the model as a jitted `stateless_call`, numpy in and out."""
    import jax
    import numpy as np

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def run(trainable: list, frozen: list, *inputs: jax.Array) -> object:
        outputs, _ = model.stateless_call(
            trainable, frozen, list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        return outputs

    def call() -> None:
        for t in jax.tree.leaves(run(trainable, frozen, *feeds)):
            np.asarray(t)
    return call


if __name__ == "__main__":
    main()
