"""chain._Memo reads without its lock (issue 18: the lock cost a signer more than the look-up).
Readers racing writers that evict what they read must neither raise nor break the bound."""

import sys
import threading

from brski.chain import _Memo


def test_reads_race_evicting_writes():
    memo = _Memo(8)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            memo.put(b"k%d" % (n % 64), n)
            n += 1

    def reader() -> None:
        try:
            for i in range(100_000):
                value = memo.get(b"k%d" % (i % 64))
                assert value is None or isinstance(value, int)
        except BaseException as exc:  # reported below: a thread cannot fail the test
            errors.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    threads = [threading.Thread(target=writer) for _ in range(2)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    try:
        for thread in threads + readers:
            thread.start()
        for thread in readers:
            thread.join()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(old_interval)
    assert errors == []
    assert len(memo) <= 8
    memo.put(b"fresh", 1)
    assert memo.get(b"fresh") == 1
