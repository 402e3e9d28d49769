"""The float16 feature rows that train-svm's classes share: positives and cached negatives.

Hard-negative mining caches, per class, the windows its current SVM scores above -1.0001.
Early in mining every class caches nearly every negative window of the same images (all of
the first image's, by the release's rule), and later the classes' caches still overlap; a
window's feature is the same for every class, so it is stored once here and each class's
cache keeps only keys (:class:`svm.hard_negatives.NegativeCache`). The solver reads the rows
in place (:func:`svm.dcd.solve_dcd` with ``rows``).

Rows live in one ``float16`` matrix, keyed by ``int64`` keys that increase with insertion
(positives first with negative keys, then windows ``image << 24 | index`` image by image),
so a key's row is found by binary search. The matrix is an anonymous memory map reserved
once at half the machine's memory: only the pages written are memory, so it grows without
copies. Whenever it has grown by a quarter since the last check, rows no class holds any more
are dropped in place (compaction) and the pages past the end are returned to the system:
memory is the union of the classes' caches plus at most a quarter of slack.
"""

from __future__ import annotations

from collections.abc import Callable

import mmap
import os

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["HalfStore"]


@numba.njit(cache=True)
def _move_rows_down(data, keep):
    """``data[k] = data[keep[k]]`` for ascending ``keep`` (so ``keep[k] >= k``), in place."""
    for k in range(keep.shape[0]):
        src = keep[k]
        if src != k:
            data[k, :] = data[src, :]


def _reservable_bytes() -> int:
    """Half the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class HalfStore:
    """``float16`` rows keyed by increasing ``int64`` keys.

    Args:
        dim: row length ``D``.
        live: returns the keys still needed (``np.ndarray`` int64, any order, duplicates
            allowed); rows of other keys are dropped at the next compaction.
        reserve_bytes: address space reserved (half the physical memory by default).
    """

    def __init__(self, dim: int, live: Callable[[], np.ndarray], reserve_bytes: int | None = None) -> None:
        row_bytes = 2 * dim
        rows = max(1, (reserve_bytes or _reservable_bytes()) // row_bytes)
        self._map = mmap.mmap(-1, rows * row_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._data = np.frombuffer(self._map, dtype=np.float16).reshape(rows, dim)
        self._keys = np.empty(0, dtype=np.int64)
        self._live = live
        self._next_check = 4096

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def data(self) -> np.ndarray:
        """``np.ndarray[M, D]`` float16, the stored rows (a view: valid until the next add)."""
        return self._data[: len(self._keys)]

    @property
    def keys(self) -> np.ndarray:
        """``np.ndarray[M]`` int64, ascending."""
        return self._keys

    def add(self, keys: Tensor | np.ndarray, features: Tensor) -> None:
        """Append rows: ``keys [K]`` ascending and above every stored key, ``features
        Tensor[K, D]`` (any float dtype, rounded to float16).

        Raises:
            MemoryError: the rows still needed exceed the reserved space.
        """
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return
        if np.any(np.diff(keys) <= 0) or (len(self._keys) and keys[0] <= self._keys[-1]):
            raise ValueError("HalfStore.add: keys must increase and follow the stored keys")
        if len(self._keys) + len(keys) > min(self._next_check, len(self._data)):
            self.compact()
        start, stop = len(self._keys), len(self._keys) + len(keys)
        if stop > len(self._data):
            raise MemoryError(f"train-svm's feature store holds {start} rows of {self._data.shape[1]} float16 values "
                              f"({start * self._data.itemsize * self._data.shape[1] / 2**30:.1f} GiB), the most it can")
        self._data[start:stop] = features.to(torch.float16).numpy()
        self._keys = np.concatenate([self._keys, keys])

    def rows(self, keys: Tensor | np.ndarray) -> np.ndarray:
        """``np.ndarray[K]`` int64 rows of stored ``keys``.

        Raises:
            KeyError: a key that is not stored.
        """
        keys = np.asarray(keys, dtype=np.int64)
        rows = np.searchsorted(self._keys, keys)
        if len(keys) and (rows.max() >= len(self._keys) or not np.array_equal(self._keys[rows], keys)):
            raise KeyError("HalfStore.rows: some keys are not stored")
        return rows

    def compact(self) -> int:
        """Drop the rows whose keys ``live()`` no longer returns, in place, and return the
        pages past the new end to the system. Returns how many rows were dropped."""
        keep = np.flatnonzero(np.isin(self._keys, self._live()))
        dropped = len(self._keys) - len(keep)
        if dropped:
            _move_rows_down(self._data.view(np.uint16), keep)
            self._keys = self._keys[keep]
            used = len(self._keys) * self._data.shape[1] * self._data.itemsize
            start = -(-used // mmap.PAGESIZE) * mmap.PAGESIZE
            if start < len(self._map):
                self._map.madvise(mmap.MADV_DONTNEED, start, len(self._map) - start)
        self._next_check = max(4096, len(self._keys) * 5 // 4)
        return dropped
