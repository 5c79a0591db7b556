"""KServe v2 datatypes ("FP32", "BYTES", ...) and the internal dtype names they map to."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from service.errors import InvalidInput, Overloaded, clip
from service.types import STRING, TensorSpec

# Beyond these numpy cannot make the array at all (it raises, which would be INTERNAL): a
# shape like [0, 2**62, 8, 1] holds no element, yet numpy refuses it.
MAX_RANK = 32
MAX_ELEMENTS = 2**40

# KServe datatype -> internal dtype name (numpy's names, plus "string" for BYTES).
# BF16 is left out: the contract does not list it and numpy has no native bfloat16.
TO_INTERNAL: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": STRING,
}
TO_KSERVE: dict[str, str] = {internal: kserve for kserve, internal in TO_INTERNAL.items()}


def to_internal(datatype: str) -> str:
    """The internal dtype name of a KServe datatype sent by a client.

    Raises InvalidInput for a datatype this server does not know.
    """
    try:
        return TO_INTERNAL[datatype]
    except KeyError:
        known = ", ".join(TO_INTERNAL)
        raise InvalidInput(f"unknown datatype {datatype!r}; use one of {known}") from None


def to_kserve(dtype: str | np.dtype) -> str:
    """The KServe datatype of an internal dtype name or a numpy dtype.

    Any text or object dtype is BYTES. Raises ValueError for a dtype KServe cannot carry:
    that is the server's problem (a model output), not the client's.
    """
    if isinstance(dtype, np.dtype):
        if dtype.kind in "OSU":
            return "BYTES"
        dtype = dtype.name
    try:
        return TO_KSERVE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no KServe v2 datatype") from None


@functools.lru_cache(maxsize=32)  # per request and input; errors are not cached
def numpy_dtype(datatype: str) -> np.dtype:
    """The little-endian numpy dtype of a KServe datatype's raw bytes; object for BYTES.

    Raises InvalidInput for an unknown datatype.
    """
    internal = to_internal(datatype)
    if internal == STRING:
        return np.dtype(object)
    return np.dtype(internal).newbyteorder("<")


def element_count(name: str, shape: Sequence[int]) -> int:
    """The element count of a client's shape, refusing (InvalidInput) a negative
    dimension, a rank over MAX_RANK, or dimensions whose product (0 counted as 1) passes
    MAX_ELEMENTS, before anything is allocated."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {clip(name)}: shape has {len(shape)} dimensions, at most "
                           f"{MAX_RANK} are served")
    dims = list(shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {clip(name)}: shape {dims} has a negative dimension")
    if math.prod(max(d, 1) for d in dims) > MAX_ELEMENTS:
        raise InvalidInput(f"input {clip(name)}: shape {dims} is too large: its dimensions "
                           f"(0 counted as 1) multiply past 2**40")
    return math.prod(dims)


def check_declared(name: str, shape: Sequence[int], specs: Mapping[str, TensorSpec] | None,
                   max_rows: int | None = None) -> None:
    """Refuse a declared tensor before its data is decoded, for what its shape already
    tells: a shape the endpoint's input cannot take (the check model.py makes again on
    the array), or more rows than the model's queue holds
    (the batcher's limit). 60 MiB of BYTES declaring 15.7 M rows once took 18 s to split
    before the queue refused it."""
    spec = (specs or {}).get(name)
    if spec is None:  # not an input it takes (or an optional one): model.py says so
        return
    if not spec.fits(shape):
        raise InvalidInput(f"input {spec.name!r} has shape {list(shape)}; "
                           f"expected {spec.describe()} (-1: any size)")
    rows = shape[0] if shape else 1
    if max_rows is not None and rows > max_rows:
        raise Overloaded(f"the request has {rows} rows, more than the model's queue holds "
                         f"(max_queue_size {max_rows}): send at most {max_rows} rows per "
                         "request")
