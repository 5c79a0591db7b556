"""A protobuf repeated field (typed tensor contents) copied into numpy a chunk at a time.

Converting one in a single call (np.fromiter, np.array) is one C loop that holds the GIL:
15.7 M floats of `fp32_contents` or `float_val` held it 1.3-1.6 s, and every other call
(health included) waited, although the decode ran on a thread. Between chunks the GIL
is offered to the other threads; the event loop takes its turn there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# Elements per chunk: some tens of milliseconds of copying each.
CHUNK = 1 << 18


def to_array(values: Sequence[Any], dtype: str | np.dtype, count: int) -> np.ndarray:
    """The first `count` elements of `values` as a 1-D array of `dtype` (object: bytes)."""
    array = np.empty(count, dtype=dtype)
    for start in range(0, count, CHUNK):
        if start:
            time.sleep(0)  # releases the GIL: a waiting thread gets it
        # A slice of a repeated field is a list: numpy copies it in one C loop.
        array[start:start + CHUNK] = values[start:start + CHUNK]
    return array
