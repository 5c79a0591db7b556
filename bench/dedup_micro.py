"""Micro-benchmark of service/dedup.py: the cost per batch of finding identical rows
(`distinct`), with and without repeats, and of expanding a result back (`expand`).

    .venv/bin/python bench/dedup_micro.py

Runs on the event loop in the server, once per batch, so it must stay small next to a
batch's compute; best of 5 repeats, in microseconds.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import numpy as np

from service.dedup import distinct
from service.types import Batch


def micros(fn: Callable[[], object], number: int = 2000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def cases() -> dict[str, Batch]:
    rng = np.random.default_rng(0)
    images = rng.random((16, 28, 28, 1)).astype(np.float32)
    x = rng.random((8, 64)).astype(np.float32)
    onehot = np.eye(64, dtype=np.float32)  # fingerprints collide: the exact path decides
    endpoints = ("a", "b", "c")
    return {
        "64 rows 28x28x1 f32, all distinct": Batch(
            "g", ("y",), {"image": rng.random((64, 28, 28, 1)).astype(np.float32)}, None),
        "32 rows 64 f32, all distinct": Batch(
            "g", ("y",), {"x": rng.random((32, 64)).astype(np.float32)}, None),
        "64 rows one-hot 64 f32, all distinct": Batch("g", ("y",), {"x": onehot}, None),
        "32 rows 2 strings, all distinct": Batch(
            "g", ("y",), {"w": np.array([[b"w%d" % i, b"x"] for i in range(32)], dtype=object)},
            None),
        "64 rows 28x28x1, 16 distinct, 3 masked outputs": Batch(
            "g", endpoints, {"image": np.concatenate([images] * 4)},
            {o: np.repeat(np.arange(4) % 3 == i, 16) for i, o in enumerate(endpoints)}),
        "32 rows 64 f32, 8 distinct": Batch("g", ("y",), {"x": np.concatenate([x] * 4)}, None),
    }


def main() -> None:
    for name, batch in cases().items():
        found = distinct(batch)
        line = f"{name}: distinct {micros(lambda b=batch: distinct(b)):.1f} us"
        if found is not None:
            small = found.batch
            result = {o: np.zeros((int(small.masks[o].sum()) if small.masks else small.rows, 10),
                                  np.float32) for o in small.outputs}
            line += (f", expand {micros(lambda f=found, r=result: f.expand(r)):.1f} us "
                     f"(10 floats per row and output), {found.saved} rows saved")
        print(line)


if __name__ == "__main__":
    main()
