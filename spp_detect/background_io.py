"""Read ahead and write behind: the CPU's share of a stage done in a background thread
while the device works, the GPU data path of ``extract``, ``detect`` and ``finetune``.

On a GPU, a stage's own work on an image (pooling, fc layers, SVM scores, NMS) takes
milliseconds, while decoding the image's cached maps on the CPU takes ~0.02 s at one
scale and ~0.1 s at five (zlib + fp16 -> fp32, ``bench/results/detect_speed.json``): done
in turn, the GPU would wait for the CPU most of the time. :func:`read_ahead` decodes the
next ``depth`` images in background threads (``zlib.decompress`` and the numpy / torch
copies release the GIL) and uploads each one once, from pinned memory
(:meth:`spp_detect.cache.CachedImage.to`), while the main thread works on the current
one. On the CPU the stages read in turn: a reading thread would only take one of the
cores the pooling and fc layers already use, and the results are the same either way.
Fine-tuning's passes are the exception (:data:`spp_detect.finetune.DECODE_THREADS`): a
pass only decodes and pools, decoding is most of it, and two decoding threads halve it on
a 2-core CPU.

The time the consumer spends waiting for the next item is what a stage reports as its
``decode`` time: on a GPU it is the share of the stage spent waiting on the CPU.

:class:`WriteBehind` is the other direction: ``extract`` compresses and writes an image's
maps (zlib, ~0.05 s per image at one scale) while the trunk runs on the next image.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from spp_detect.device import canonical_device

__all__ = ["read_ahead", "reads_ahead", "Waited", "WriteBehind"]

T = TypeVar("T")
R = TypeVar("R")

_END = object()


def reads_ahead(device: torch.device | str) -> bool:
    """Whether the stages read ahead and write behind in a background thread on ``device``
    (CUDA: yes; the CPU: no, see the module docstring)."""
    return canonical_device(device).type == "cuda"


class Waited:
    """Seconds a consumer of :func:`read_ahead` spent waiting for its next item (``seconds``)."""

    def __init__(self) -> None:
        self.seconds = 0.0


def read_ahead(
    items: Iterable[T],
    prepare: Callable[[T], R],
    *,
    background: bool,
    depth: int = 2,
    threads: int = 1,
    waited: Waited | None = None,
) -> Iterator[tuple[T, R]]:
    """``(item, prepare(item))`` for each of ``items``, in order.

    Args:
        prepare: e.g. decode an image's cache file and upload it to the device; runs in
            ``threads`` background threads when ``background``, at most ``max(depth,
            threads)`` items ahead of the consumer (so at most that many plus one prepared
            items are alive at once), else in the caller's thread when the item is reached.
        waited: accumulates the seconds the caller waited for prepared items (in turn:
            the whole ``prepare`` time).

    An exception raised by ``prepare`` is raised here, at the item it failed on, after the
    items before it were yielded. Stopping early (``break``, an exception in the consumer)
    lets the threads finish their current items and prepares no more.
    """
    waited = waited if waited is not None else Waited()
    if not background:
        for item in items:
            start = time.perf_counter()
            prepared = prepare(item)
            waited.seconds += time.perf_counter() - start
            yield item, prepared
        return
    ahead = max(1, depth, threads)
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="read-ahead")
    pending: deque[tuple[T, Future]] = deque()
    remaining = iter(items)
    try:
        while True:
            while len(pending) < ahead:
                item = next(remaining, _END)
                if item is _END:
                    break
                pending.append((item, pool.submit(prepare, item)))
            if not pending:
                return
            item, future = pending.popleft()
            start = time.perf_counter()
            prepared = future.result()
            waited.seconds += time.perf_counter() - start
            yield item, prepared
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the threads' current items finish, no more start


class WriteBehind:
    """Runs writes (``submit(fn, *args)``) one at a time in a background thread, at most one
    behind the caller, or at once in the caller's thread when not ``background``.

    ``results`` holds each write's return value, in order. A write's exception is raised
    by the next :meth:`submit` or by :meth:`close` (a context manager's exit), which waits
    for the last write: after it, every submitted write is on disk.
    """

    def __init__(self, background: bool) -> None:
        self.results: list = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind") if background else None
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., R], *args) -> None:
        if self._pool is None:
            self.results.append(fn(*args))
            return
        self._wait()
        self._pending = self._pool.submit(fn, *args)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.results.append(pending.result())

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
