"""Read ahead and write behind: the CPU's share of a stage done in a background thread
while the device works, the GPU data path of ``extract``, ``detect`` and ``finetune``.

On a GPU, a stage's own work on an image (pooling, fc layers, SVM scores, NMS) takes
milliseconds, while decoding the image's cached maps on the CPU takes ~0.02 s at one
scale and ~0.1 s at five (zlib + fp16 -> fp32, ``bench/results/detect_speed.json``): done
in turn, the GPU would wait for the CPU most of the time. :func:`read_ahead` decodes the
next ``depth`` images in one background thread (``zlib.decompress`` and the numpy / torch
copies release the GIL) and uploads each one once, from pinned memory
(:meth:`spp_detect.cache.CachedImage.to`), while the main thread works on the current
one. On the CPU the stages read in turn: a reading thread would only take one of the
cores the pooling and fc layers already use, and the results are the same either way.

The time the consumer spends waiting for the next item is what a stage reports as its
``decode`` time: on a GPU it is the share of the stage spent waiting on the CPU.

:class:`WriteBehind` is the other direction: ``extract`` compresses and writes an image's
maps (zlib, ~0.05 s per image at one scale) while the trunk runs on the next image.
"""

from __future__ import annotations

import queue
import threading
import time
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
    waited: Waited | None = None,
) -> Iterator[tuple[T, R]]:
    """``(item, prepare(item))`` for each of ``items``, in order.

    Args:
        prepare: e.g. decode an image's cache file and upload it to the device; runs in one
            background thread when ``background``, at most ``depth`` items ahead of the
            consumer (so at most ``depth + 1`` prepared items are alive at once), else in
            the caller's thread when the item is reached.
        waited: accumulates the seconds the caller waited for prepared items (in turn:
            the whole ``prepare`` time).

    An exception raised by ``prepare`` is raised here, at the item it failed on, after the
    items before it were yielded. Stopping early (``break``, an exception in the consumer)
    stops the thread after its current item.
    """
    waited = waited if waited is not None else Waited()
    if not background:
        for item in items:
            start = time.perf_counter()
            prepared = prepare(item)
            waited.seconds += time.perf_counter() - start
            yield item, prepared
        return
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                result = (item, prepare(item), None)
                while not stop.is_set():
                    try:
                        ready.put(result, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put((None, None, exc))
            return
        ready.put((_END, None, None))

    thread = threading.Thread(target=work, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            start = time.perf_counter()
            item, prepared, error = ready.get()
            waited.seconds += time.perf_counter() - start
            if error is not None:
                raise error
            if item is _END:
                return
            yield item, prepared
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() and let the thread see stop
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


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
