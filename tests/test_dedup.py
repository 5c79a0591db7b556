"""De-duplication of identical rows (service/dedup.py) alone: no batcher, no TensorFlow.

Every check compares against the plain computation of the whole batch: computing the
distinct rows and expanding must give exactly what computing every row gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.dedup import distinct
from service.types import Batch

Arrays = dict[str, np.ndarray]
OUTPUTS = ("y", "z", "s")


def compute(batch: Batch) -> Arrays:
    """Row-wise outputs of every feed, as a runtime computes them (masks honoured)."""
    x, k = batch.feeds["x"], batch.feeds["k"]
    full = {"y": x.sum(axis=(1, 2)) * k, "z": x[:, 0, :] + k[:, None],
            "s": np.array([f"{r}" for r in k], dtype=object)}
    return {o: full[o] if batch.masks is None else full[o][batch.masks[o]]
            for o in batch.outputs}


def row_keys(batch: Batch) -> set[bytes]:
    return {batch.feeds["x"][i].tobytes() + batch.feeds["k"][i].tobytes()
            for i in range(batch.rows)}


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    """A batch whose rows are drawn from a small pool, so rows repeat (or not); rows that
    share one feed's values but not the other's are in the pool too."""
    pool = draw(st.integers(1, 6))
    rows = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, 3, size=(pool, 2, 3)).astype(np.float32)
    ks = rng.integers(0, 2, size=pool).astype(np.int64)
    xs[-1] = xs[0]  # the same x as row 0 with, maybe, another k
    pick = np.array(draw(st.lists(st.integers(0, pool - 1), min_size=rows, max_size=rows)))
    outputs = tuple(draw(st.lists(st.sampled_from(OUTPUTS), min_size=1, max_size=3,
                                  unique=True)))
    masks = None
    if draw(st.booleans()):
        masks = {o: rng.random(rows) < 0.6 for o in outputs}
    return Batch("g", outputs, {"x": xs[pick], "k": ks[pick]}, masks)


@settings(max_examples=300, deadline=None)
@given(batches())
def test_computing_the_distinct_rows_then_expanding_equals_computing_every_row(
        batch: Batch) -> None:
    want = compute(batch)
    found = distinct(batch)
    keys = row_keys(batch)
    if found is None:
        assert len(keys) == batch.rows  # None only when no row repeats
        return
    small = found.batch
    assert small.rows == len(keys) == len(row_keys(small))  # each distinct row once
    assert found.saved == batch.rows - len(keys)
    assert small.outputs == batch.outputs and small.source == batch.source
    if batch.masks is not None:  # a distinct row is computed for o iff a copy asked for o
        for o, mask in batch.masks.items():
            asked = {batch.feeds["x"][i].tobytes() + batch.feeds["k"][i].tobytes()
                     for i in np.flatnonzero(mask)}
            computed = {small.feeds["x"][i].tobytes() + small.feeds["k"][i].tobytes()
                        for i in np.flatnonzero(small.masks[o])}
            assert computed == asked
    got = found.expand(compute(small))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


def test_a_batch_without_repeated_rows_runs_untouched() -> None:
    batch = Batch("g", ("y",), {"x": np.arange(12, dtype=np.float32).reshape(4, 1, 3),
                                "k": np.zeros(4, dtype=np.int64)}, None)
    assert distinct(batch) is None


def test_rows_equal_in_one_feed_but_not_the_other_are_not_merged() -> None:
    x = np.ones((3, 1, 2), dtype=np.float32)
    batch = Batch("g", ("y",), {"x": x, "k": np.array([1, 2, 1])}, None)
    found = distinct(batch)
    assert found is not None and found.batch.rows == 2
    np.testing.assert_array_equal(found.inverse, [0, 1, 0])  # first-occurrence order


def test_byte_identical_means_bytes_negative_zero_is_another_row() -> None:
    batch = Batch("g", ("y",), {"x": np.array([0.0, -0.0, 0.0], dtype=np.float32)}, None)
    found = distinct(batch)
    assert found is not None
    np.testing.assert_array_equal(found.inverse, [0, 1, 0])


def test_rows_of_the_same_words_in_another_order_are_told_apart() -> None:
    # Their cheap fingerprints (sums of 8-byte words) collide: the exact comparison decides.
    x = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0], [3.0, 0.0]])
    found = distinct(Batch("g", ("y",), {"x": x}, None))
    assert found is not None
    np.testing.assert_array_equal(found.inverse, [0, 1, 0, 2])
    assert distinct(Batch("g", ("y",), {"x": x[:2]}, None)) is None


def test_string_rows_are_deduplicated_exactly() -> None:
    words = np.array([[b"a", b"bc"], [b"a", b"b"], [b"a", b"bc"], [b"ab", b"c"]], dtype=object)
    batch = Batch("g", ("n",), {"w": words, "i": np.array([1, 1, 1, 1], dtype=np.int32)},
                  {"n": np.array([False, True, True, True])})
    found = distinct(batch)
    assert found is not None
    np.testing.assert_array_equal(found.inverse, [0, 1, 0, 2])
    np.testing.assert_array_equal(found.batch.masks["n"], [True, True, True])
    lengths = np.array([sum(map(len, r)) for r in found.batch.feeds["w"]])
    np.testing.assert_array_equal(found.expand({"n": lengths})["n"], [2, 3, 3])
    assert distinct(Batch("g", ("n",), {"w": words[[0, 1, 3]]}, None)) is None


def test_a_result_with_the_wrong_row_count_is_refused_before_expanding() -> None:
    batch = Batch("g", ("y",), {"x": np.array([1.0, 1.0, 2.0])}, None)
    found = distinct(batch)
    assert found is not None
    with pytest.raises(RuntimeError, match="3 rows for output 'y', expected 2"):
        found.expand({"y": np.zeros(3)})  # the runtime answered the original rows
