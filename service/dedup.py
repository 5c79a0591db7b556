"""Rows with byte-identical inputs inside one batch share their compute.

`distinct(batch)` finds the batch's distinct rows (a row's every input tensor
byte-identical to another's) and returns a smaller Batch of them, plus the plan to
`expand` its result back to every row of the original batch, masks included. When every
row is distinct it returns None and the batch runs untouched. Pure numpy, tested alone.

Byte-identical, not equal: -0.0 and 0.0 (or two NaNs with different payloads) count as
different rows, which only costs a row of compute. String inputs (object arrays of bytes)
are compared element by element in Python, slower but exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.types import Batch

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Distinct:
    """The distinct rows of a batch, and where each original row's answer is among them."""

    batch: Batch  # the distinct rows, in the order they first occur
    inverse: np.ndarray  # per original row, its row in `batch`
    masks: Arrays | None  # the original batch's masks

    @property
    def saved(self) -> int:
        """Rows not computed: copies of a row computed once."""
        return len(self.inverse) - self.batch.rows

    def expand(self, result: Arrays) -> Arrays:
        """The distinct rows' result as the original batch's: every row, or with masks,
        each output holding exactly the original rows that asked for it."""
        self.batch.check(result)
        expanded = {}
        # distinct() sets both masks or neither: the small batch's come from the original's.
        masks, small_masks = self.masks, self.batch.masks
        for name in self.batch.outputs:
            if masks is None or small_masks is None:
                expanded[name] = result[name][self.inverse]
            else:
                # Output `name` of the small batch holds only its masked rows: a distinct
                # row's place there is how many masked rows come before it.
                place = np.cumsum(small_masks[name]) - 1
                expanded[name] = result[name][place[self.inverse[masks[name]]]]
        return expanded


def distinct(batch: Batch) -> Distinct | None:
    """The batch's distinct rows as a smaller batch, or None if no row repeats."""
    found = _object_rows(batch.feeds) if any(
        a.dtype == object for a in batch.feeds.values()) else _numeric_rows(batch.feeds)
    if found is None:
        return None
    first, inverse = found
    feeds = {name: a[first] for name, a in batch.feeds.items()}
    masks = None
    if batch.masks is not None:  # a distinct row asks for what any of its copies asks
        masks = {}
        for name, mask in batch.masks.items():
            masks[name] = np.zeros(len(first), dtype=bool)
            masks[name][inverse[mask]] = True
    return Distinct(Batch(batch.source, batch.outputs, feeds, masks), inverse, batch.masks)


def _numeric_rows(feeds: Arrays) -> tuple[np.ndarray, np.ndarray] | None:
    """(first occurrences, inverse) of the rows, or None if all differ.

    Cheap first: a fingerprint per row (the wrapping sum of its 8-byte words), sorted. Rows
    with different fingerprints differ, so all-distinct fingerprints end it. Rows that share
    one are compared byte for byte; if any pair differs (a collision: the same words in
    another order), one sort of the rows' whole bytes decides instead."""
    rows = len(next(iter(feeds.values())))
    parts = [np.ascontiguousarray(a).reshape(rows, -1).view(np.uint8) for a in feeds.values()]
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if joined.shape[1] == 0:  # rows of no values: nothing to compare, nothing to save
        return None
    if joined.shape[1] % 8:
        joined = np.pad(joined, ((0, 0), (0, 8 - joined.shape[1] % 8)))
    words = np.ascontiguousarray(joined).view(np.uint64)
    order, starts = _runs(words.sum(axis=1))
    if starts.all():
        return None
    heads = order[starts][np.cumsum(starts) - 1]  # per sorted row, the first of its run
    if not (words[order[~starts]] == words[heads[~starts]]).all():
        order, starts = _runs(words.view(np.dtype((np.void, words.shape[1] * 8))).ravel())
        if starts.all():
            return None
    return _first_and_inverse(order, starts)


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stable sort of the keys, and which sorted keys start a run of equal ones."""
    order = np.argsort(keys, kind="stable")  # stable: each run starts at its first row
    ordered = keys[order]
    starts = np.empty(len(keys), dtype=bool)
    starts[0] = True
    starts[1:] = ordered[1:] != ordered[:-1]
    return order, starts


def _first_and_inverse(order: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From runs of equal rows: each distinct row's first occurrence, in row order, and
    each row's place among them."""
    first_sorted = order[starts]  # in key order
    rank = np.empty(len(first_sorted), dtype=np.intp)  # key order -> occurrence order
    rank[np.argsort(first_sorted)] = np.arange(len(first_sorted))
    inverse = np.empty(len(order), dtype=np.intp)
    inverse[order] = rank[np.cumsum(starts) - 1]
    return np.sort(first_sorted), inverse


def _object_rows(feeds: Arrays) -> tuple[np.ndarray, np.ndarray] | None:
    """The same for feeds holding strings: each row's values as a tuple, in a dict."""
    rows = len(next(iter(feeds.values())))
    flat = [a.reshape(rows, -1) for a in feeds.values()]
    seen: dict[tuple[object, ...], int] = {}
    first: list[int] = []
    inverse = np.empty(rows, dtype=np.intp)
    for i in range(rows):
        key = tuple(tuple(f[i].tolist()) if f.dtype == object else f[i].tobytes()
                    for f in flat)
        j = seen.setdefault(key, len(seen))
        if j == len(first):
            first.append(i)
        inverse[i] = j
    if len(first) == rows:
        return None
    return np.array(first, dtype=np.intp), inverse
