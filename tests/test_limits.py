"""Admission control: caps, per-pledge token buckets, release, and limits changed on reload."""

from dataclasses import replace

from joinproxyd.config import Limits
from joinproxyd.limits import MAX_TRACKED_PLEDGES, Admission, TokenBucket
from joinproxyd.model import DropReason

LIMITS = Limits(circuits_total=5, circuits_per_interface=3, circuits_per_pledge=2,
                new_circuits_per_second=1.0, new_circuits_burst=2)


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(tokens=2, stamp=0.0)
    assert bucket.take(0.0, rate=1.0, burst=2)
    assert bucket.take(0.0, rate=1.0, burst=2)
    assert not bucket.take(0.5, rate=1.0, burst=2)
    assert bucket.take(1.0, rate=1.0, burst=2)
    # Never more than the burst, however long it waited.
    assert bucket.take(100.0, 1.0, 2) and bucket.take(100.0, 1.0, 2)
    assert not bucket.take(100.0, 1.0, 2)


def test_no_registrar_is_refused_first():
    assert Admission(LIMITS).admit("join0", "p", 0.0, have_registrar=False) \
        == DropReason.NO_REGISTRAR


def test_per_pledge_cap_then_release():
    adm = Admission(LIMITS)
    assert adm.admit("join0", "p1", 0.0, True) is None
    assert adm.admit("join0", "p1", 10.0, True) is None
    assert adm.admit("join0", "p1", 20.0, True) == DropReason.LIMIT_PLEDGE
    adm.release("join0", "p1")
    assert adm.admit("join0", "p1", 30.0, True) is None
    assert adm.total == 2 and adm.per_pledge == {"p1": 2}


def test_rate_limit_per_pledge_address():
    adm = Admission(replace(LIMITS, circuits_per_pledge=100, circuits_per_interface=100,
                            circuits_total=100))
    assert adm.admit("join0", "p1", 0.0, True) is None
    assert adm.admit("join0", "p1", 0.0, True) is None
    assert adm.admit("join0", "p1", 0.0, True) == DropReason.RATE_LIMIT
    assert adm.admit("join0", "p2", 0.0, True) is None  # another pledge has its own bucket
    assert adm.admit("join0", "p1", 1.0, True) is None


def test_interface_and_total_caps():
    adm = Admission(LIMITS)
    for i in range(3):
        assert adm.admit("join0", f"a{i}", 0.0, True) is None
    assert adm.admit("join0", "a9", 0.0, True) == DropReason.LIMIT_INTERFACE
    assert adm.admit("join1", "b0", 0.0, True) is None
    assert adm.admit("join1", "b1", 0.0, True) is None
    assert adm.admit("join1", "b2", 0.0, True) == DropReason.LIMIT_TOTAL


def test_new_limits_apply_without_forgetting_open_circuits():
    adm = Admission(LIMITS)
    assert adm.admit("join0", "p1", 0.0, True) is None
    adm.limits = replace(LIMITS, circuits_per_pledge=1)
    assert adm.admit("join0", "p1", 5.0, True) == DropReason.LIMIT_PLEDGE
    adm.release("join0", "p1")
    assert adm.total == 0 and adm.per_interface == {} and adm.per_pledge == {}


def test_bucket_table_is_bounded():
    adm = Admission(replace(LIMITS, circuits_total=10**6, circuits_per_interface=10**6))
    for i in range(MAX_TRACKED_PLEDGES + 10):
        adm._bucket(f"p{i}", 0.0)
    assert len(adm._buckets) == MAX_TRACKED_PLEDGES
