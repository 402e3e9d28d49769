"""The background reading and writing of the GPU data path (``spp_detect.background_io``):
the same items in the same order as in turn, errors raised at the item they belong to,
at most ``depth`` items prepared ahead, and writes all done at close."""

from __future__ import annotations

import threading
import time

import pytest

from spp_detect.background_io import Waited, WriteBehind, read_ahead, reads_ahead


@pytest.mark.parametrize("background", [False, True])
def test_read_ahead_yields_every_item_in_order_with_its_prepared_value(background):
    waited = Waited()
    got = list(read_ahead(range(50), lambda i: i * i, background=background, waited=waited))
    assert got == [(i, i * i) for i in range(50)]
    assert waited.seconds >= 0


@pytest.mark.parametrize("background", [False, True])
def test_read_ahead_raises_the_error_at_the_item_it_failed_on(background):
    def prepare(i):
        if i == 3:
            raise ValueError("image 3 is damaged")
        return i

    seen = []
    with pytest.raises(ValueError, match="image 3 is damaged"):
        for item, _ in read_ahead(range(10), prepare, background=background):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_read_ahead_prepares_at_most_depth_items_ahead_and_stops_when_the_consumer_stops():
    prepared, lock = [], threading.Lock()

    def prepare(i):
        with lock:
            prepared.append(i)
        return i

    items = read_ahead(range(1000), prepare, background=True, depth=2)
    assert next(items) == (0, 0)
    time.sleep(0.3)  # the thread fills the queue (2) and holds one more, then waits
    assert len(prepared) <= 1 + 2 + 1
    items.close()  # the consumer stops: the thread ends
    time.sleep(0.3)
    count = len(prepared)
    time.sleep(0.2)
    assert len(prepared) == count <= 5
    assert not any(t.name.startswith("read-ahead") and t.is_alive() for t in threading.enumerate())


def test_waited_is_the_whole_prepare_time_in_turn():
    waited = Waited()
    list(read_ahead(range(3), lambda i: time.sleep(0.05), background=False, waited=waited))
    assert waited.seconds >= 0.15


@pytest.mark.parametrize("background", [False, True])
def test_write_behind_runs_every_write_in_order_and_is_done_at_close(background):
    written = []
    with WriteBehind(background) as writes:
        for i in range(20):
            writes.submit(lambda i: (time.sleep(0.001), written.append(i), i)[-1], i)
    assert written == list(range(20)) and writes.results == list(range(20))


@pytest.mark.parametrize("background", [False, True])
def test_write_behind_raises_a_failed_write(background):
    def write(i):
        if i == 1:
            raise OSError("disk full")
        return i

    with pytest.raises(OSError, match="disk full"):
        with WriteBehind(background) as writes:
            for i in range(3):
                writes.submit(write, i)


def test_only_cuda_reads_ahead():
    assert reads_ahead("cuda:0") and reads_ahead("cuda")
    assert not reads_ahead("cpu") and not reads_ahead("cpu:0")
