"""The bookkeeping of listeners that could not bind (pure code, a fake clock): backoff 1 s
doubling to 30 s, every failure counted by reason, logged once per reason (then at debug),
the recovery logged, and the retry timer waking the owner."""

import asyncio
import errno
import logging

import pytest

from joinproxyd.listeners import Listeners, backoff, bind_reason
from joinproxyd.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def in_use() -> OSError:
    return OSError(errno.EADDRINUSE, "Address already in use")


def errors(metrics: Metrics, **labels: str) -> float:
    value = metrics.registry.get_sample_value("joinproxyd_listener_errors_total", labels)
    return value or 0.0


def test_backoff_doubles_to_thirty_seconds():
    assert [backoff(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_reasons_by_errno():
    assert bind_reason(in_use()) == "address-in-use"
    assert bind_reason(OSError(errno.EADDRNOTAVAIL, "x")) == "address-not-available"
    assert bind_reason(OSError(errno.EACCES, "x")) == "permission"
    assert bind_reason(OSError(errno.EINVAL, "x")) == "error"
    assert bind_reason(RuntimeError("zeroconf")) == "error"


def test_failures_are_counted_logged_once_and_retried_after_the_backoff(caplog):
    metrics, clock = Metrics(), Clock()
    book = Listeners(metrics, logging.getLogger("test.listeners"), clock=clock)
    where = "[fe80::1%join0]:8443"
    caplog.set_level(logging.DEBUG, "test.listeners")
    assert book.due("join0", "circuit", where)
    assert book.failed("join0", "circuit", where, in_use()) == 1
    assert not book.due("join0", "circuit", where)
    clock.now += 1
    assert book.due("join0", "circuit", where)
    assert book.failed("join0", "circuit", where, in_use()) == 2
    clock.now += 1.5
    assert not book.due("join0", "circuit", where)
    # another port (a reload) is tried at once, and is a first failure again
    assert book.due("join0", "circuit", "[fe80::1%join0]:9443")
    assert errors(metrics, interface="join0", mode="circuit", reason="address-in-use") == 2
    errors_logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors_logged) == 1
    assert "cannot listen on [fe80::1%join0]:8443: Address already in use" in \
        errors_logged[0].getMessage()
    assert book.describe("join0", "circuit") == (
        "circuit: cannot listen on [fe80::1%join0]:8443: Address already in use "
        "(2 attempts, next in 1 s)")
    (entry,) = book.status()
    assert (entry["reason"], entry["attempts"], entry["retry_in"]) == ("address-in-use", 2, 0.5)

    book.bound("join0", "circuit")
    assert book.failures == {} and book.describe("join0", "circuit") is None
    assert "listening on [fe80::1%join0]:8443 after 2 failed attempts" in caplog.text
    # the counter keeps what happened
    assert errors(metrics, interface="join0", mode="circuit", reason="address-in-use") == 2


def test_a_new_reason_is_logged_again(caplog):
    book = Listeners(Metrics(), logging.getLogger("test.listeners2"), clock=Clock())
    caplog.set_level(logging.DEBUG, "test.listeners2")
    book.failed("join0", "circuit", "x", in_use())
    book.failed("join0", "circuit", "x", in_use())
    book.failed("join0", "circuit", "x", OSError(errno.EADDRNOTAVAIL, "Cannot assign"))
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2


def test_the_timer_wakes_the_owner_and_forget_cancels_it():
    async def scenario() -> tuple[int, int]:
        woken = []
        book = Listeners(Metrics(), logging.getLogger("test.listeners3"),
                         on_retry=lambda: woken.append(1))
        book.failed("join0", "circuit", "x", in_use())  # retry in 1 s
        book.failed("join1", "circuit", "y", in_use())
        book.forget("join1", "circuit")
        await asyncio.sleep(1.3)
        first = len(woken)
        book.failed("join0", "circuit", "x", in_use())  # now 2 s
        book.close()
        await asyncio.sleep(2.2)
        return first, len(woken)

    assert asyncio.run(scenario()) == (1, 1)


@pytest.mark.parametrize("interface", ["join0", "join1"])
def test_forget_interface_removes_the_links_series(interface):
    metrics = Metrics()
    book = Listeners(metrics, logging.getLogger("test.listeners4"), clock=Clock())
    book.failed("join0", "circuit", "x", in_use())
    book.failed("join1", "circuit", "y", in_use())
    metrics.announcements.labels("grasp", "join0").inc()
    metrics.announcements.labels("grasp", "join1").inc()
    metrics.circuits_active.labels("join0", "circuit").inc()
    metrics.forget_interface(interface)
    names = {(s.name, s.labels.get("interface")) for f in metrics.registry.collect()
             for s in f.samples}
    assert not any(i == interface for _, i in names)
    other = "join1" if interface == "join0" else "join0"
    assert ("joinproxyd_listener_errors_total", other) in names
    assert ("joinproxyd_announcements_total", other) in names
