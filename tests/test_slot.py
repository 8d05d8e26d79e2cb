import threading
import time

from edge_runtime.slot import LatestSlot


def test_newest_wins_and_drops_are_counted():
    slot = LatestSlot()
    for i in range(5):
        slot.put(i)
    assert slot.get(0) == 4
    assert slot.dropped == 4 and slot.put_count == 5
    assert slot.get(0) is None


def test_put_never_blocks_while_consumer_is_slow():
    slot = LatestSlot()
    got = []

    def slow_consumer():
        while not slot.closed:
            item = slot.get(0.05)
            if item is not None:
                got.append(item)
                time.sleep(0.02)

    t = threading.Thread(target=slow_consumer)
    t.start()
    t0 = time.monotonic()
    for i in range(2000):
        slot.put(i)
    put_time = time.monotonic() - t0
    time.sleep(0.05)
    slot.close()
    t.join(2)
    assert put_time < 1.0  # 2000 puts against a 50-per-second consumer: nothing waited on the consumer
    assert slot.dropped >= 2000 - len(got) - 1
    assert got == sorted(got)


def test_close_wakes_a_waiting_consumer():
    slot = LatestSlot()
    result = []
    t = threading.Thread(target=lambda: result.append(slot.get(10)))
    t.start()
    time.sleep(0.05)
    slot.close()
    t.join(2)
    assert result == [None] and not t.is_alive()
