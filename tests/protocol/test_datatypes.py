from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidInput
from service.protocol.datatypes import numpy_dtype, to_internal, to_kserve

PAIRS = [
    ("BOOL", "bool"), ("UINT8", "uint8"), ("UINT16", "uint16"), ("UINT32", "uint32"),
    ("UINT64", "uint64"), ("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"),
    ("INT64", "int64"), ("FP16", "float16"), ("FP32", "float32"), ("FP64", "float64"),
    ("BYTES", "string"),
]


@pytest.mark.parametrize(("kserve", "internal"), PAIRS)
def test_both_directions(kserve: str, internal: str) -> None:
    assert to_internal(kserve) == internal
    assert to_kserve(internal) == kserve


@pytest.mark.parametrize(("kserve", "internal"), [p for p in PAIRS if p[0] != "BYTES"])
def test_numpy_dtypes(kserve: str, internal: str) -> None:
    assert numpy_dtype(kserve) == np.dtype(internal)
    assert numpy_dtype(kserve).byteorder in "<|="
    assert to_kserve(np.dtype(internal)) == kserve


def test_bytes_is_object_and_any_text_dtype_is_bytes() -> None:
    assert numpy_dtype("BYTES") == np.dtype(object)
    for dtype in (np.dtype(object), np.dtype("S3"), np.dtype("U2")):
        assert to_kserve(dtype) == "BYTES"


@pytest.mark.parametrize("datatype", ["FP8", "fp32", "", "STRING", "float32"])
def test_unknown_client_datatype_is_invalid_input(datatype: str) -> None:
    with pytest.raises(InvalidInput, match="unknown datatype") as info:
        to_internal(datatype)
    assert "FP32" in str(info.value)  # lists what exists
    with pytest.raises(InvalidInput):
        numpy_dtype(datatype)


def test_dtype_kserve_cannot_carry_is_a_server_error() -> None:
    with pytest.raises(ValueError, match="complex64"):
        to_kserve(np.dtype("complex64"))
