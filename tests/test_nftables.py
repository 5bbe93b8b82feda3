"""kernel.nftables.Table: batches built, errors reported, and a real kernel in a namespace."""

import json
import secrets
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from joinproxyd.kernel import KernelError
from joinproxyd.kernel.nftables import NftablesError, Table

FORWARD = {"chain": {"name": "forward", "type": "filter", "hook": "forward", "prio": 0,
                     "policy": "accept"}}


class FakeNft:
    """Records batches; answers with a canned (rc, output, error)."""

    def __init__(self, *answers: tuple[int, Any, str]) -> None:
        self.batches: list[list[dict]] = []
        self.answers = list(answers)

    def json_cmd(self, root: dict) -> tuple[int, Any, str]:
        json.dumps(root)  # what libnftables gets must be plain JSON
        self.batches.append(root["nftables"])
        return self.answers.pop(0) if self.answers else (0, "", "")


# -- without a kernel --------------------------------------------------------------------------

def test_apply_is_one_batch_that_flushes_then_rebuilds():
    fake = FakeNft()
    Table("ip6", "t", nft=fake).apply([
        {"counter": {"name": "dropped"}},
        FORWARD,
        {"rule": {"chain": "forward", "expr": [{"counter": "dropped"}, {"drop": None}]}},
    ])
    assert len(fake.batches) == 2  # is there a table (nothing to delete), then the batch
    table = {"family": "ip6", "name": "t"}
    assert fake.batches[1] == [
        {"add": {"table": table}},
        {"flush": {"table": table}},
        {"add": {"counter": {"family": "ip6", "table": "t", "name": "dropped"}}},
        {"add": {"chain": {"family": "ip6", "table": "t", **FORWARD["chain"]}}},
        {"add": {"rule": {"family": "ip6", "table": "t", "chain": "forward",
                          "expr": [{"counter": "dropped"}, {"drop": None}]}}},
    ]


def test_delete_is_idempotent_by_construction():
    fake = FakeNft()
    Table("ip6", "t", nft=fake).delete()
    assert fake.batches == [[{"add": {"table": {"family": "ip6", "name": "t"}}},
                             {"delete": {"table": {"family": "ip6", "name": "t"}}}]]


@pytest.mark.parametrize("obj", [
    {"rule": {"family": "inet", "chain": "forward", "expr": []}},
    {"rule": {"table": "filter", "chain": "forward", "expr": []}},
    {"table": {"name": "t"}},
    {"flush": {"ruleset": None}},
    {"chain": {"name": "a"}, "rule": {"chain": "a"}},
    {"chain": "forward"},
])
def test_objects_outside_the_owned_table_are_refused(obj):
    fake = FakeNft()
    with pytest.raises(ValueError):
        Table("ip6", "t", nft=fake).apply([obj])
    assert fake.batches == []  # nothing was sent


def test_matching_family_and_table_are_accepted():
    fake = FakeNft()
    Table("ip6", "t", nft=fake).apply([{"chain": {"family": "ip6", "table": "t", "name": "c"}}])
    assert fake.batches[1][2] == {"add": {"chain": {"family": "ip6", "table": "t", "name": "c"}}}


def test_error_is_libnftables_message_with_the_command_it_points_at():
    stderr = ('Error: Unknown statement object \'bogus\'.\n{"nftables": [...]}\n        ^\n'
              "internal:0:0-0: Error: Parsing expr array at index 0 failed.\n"
              "internal:0:0-0: Error: Parsing command array at index 3 failed.\n\n")
    table = Table("ip6", "t", nft=FakeNft((0, "", ""), (1, "", stderr)))  # no table yet
    with pytest.raises(NftablesError) as caught:
        table.apply([FORWARD, {"rule": {"chain": "forward", "expr": [{"bogus": 1}]}}])
    assert str(caught.value) == (
        "nftables: Unknown statement object 'bogus'.; Parsing expr array at index 0 failed.; "
        "Parsing command array at index 3 failed. (add rule ip6 t forward)")
    assert caught.value.errno is None
    assert isinstance(caught.value, KernelError)


@pytest.mark.parametrize(("text", "code"), [
    ("Could not process rule: No such file or directory", 2),
    ("Could not process rule: Operation not supported", 95),
    ("Could not process rule: Operation not permitted", 1),
])
def test_kernel_errors_carry_their_errno(text, code):
    table = Table("ip6", "t", nft=FakeNft((1, "", f"internal:0:0-0: Error: {text}\n\n")))
    with pytest.raises(NftablesError) as caught:
        table.delete()
    assert caught.value.errno == code
    assert str(caught.value) == f"nftables: {text}"


def test_list_counters_and_exists_read_the_json_answer():
    meta = {"metainfo": {"version": "1.0.6", "json_schema_version": 1}}
    tables = (0, {"nftables": [meta, {"table": {"family": "ip6", "name": "other"}},
                               {"table": {"family": "ip6", "name": "t"}}]}, "")
    listing = (0, {"nftables": [
        meta, {"table": {"family": "ip6", "name": "t", "handle": 1}},
        {"counter": {"family": "ip6", "table": "t", "name": "dropped", "packets": 3,
                     "bytes": 240}},
        {"rule": {"family": "ip6", "table": "t", "chain": "forward",
                  "expr": [{"counter": {"packets": 9, "bytes": 9}}]}}]}, "")
    table = Table("ip6", "t", nft=FakeNft(tables, tables, listing))
    assert table.exists()
    counters = table.counters()
    assert {name: (c.packets, c.bytes) for name, c in counters.items()} == {"dropped": (3, 240)}
    absent = Table("ip6", "t", nft=FakeNft((0, {"nftables": [meta]}, "")))
    assert absent.list() == []


# -- a real kernel, in a namespace of its own -----------------------------------------------------

@pytest.fixture
def ns(as_root):
    name = f"jpxn{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, code: str, timeout: float = 30) -> Any:
    """Run `code` inside the namespace, after SPEC and with Table imported; it prints one
    JSON value."""
    program = "import json\nfrom joinproxyd.kernel.nftables import Table, NftablesError\n" \
        + SPEC + textwrap.dedent(code)
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", program],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def nft_tables(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"],
                         capture_output=True, text=True, check=True).stdout
    return [f"{o['table']['family']} {o['table']['name']}"
            for o in json.loads(out)["nftables"] if "table" in o]


SPEC = """
spec = [
    {"counter": {"name": "dropped"}},
    {"chain": {"name": "input", "type": "filter", "hook": "input", "prio": 0,
               "policy": "accept"}},
    {"rule": {"chain": "input", "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                   "right": 9999}},
        {"counter": "dropped"}, {"drop": None}]}},
]
"""


def test_apply_list_delete_in_a_real_kernel(ns):
    result = in_ns(ns, """
        t = Table("ip6", "owned")
        before = t.exists()
        t.apply(spec)
        t.apply(spec)  # idempotent: still one table, one rule
        rules = [o for o in t.list() if "rule" in o]
        counters = {k: v.packets for k, v in t.counters().items()}
        t.delete()
        t.delete()
        print(json.dumps([before, len(rules), counters, t.exists(), t.list()]))
    """)
    assert result == [False, 1, {"dropped": 0}, False, []]
    assert nft_tables(ns) == []


def test_apply_drops_what_the_new_spec_no_longer_has(ns):
    result = in_ns(ns, """
        t = Table("ip6", "owned")
        t.apply(spec + [{"chain": {"name": "extra"}}, {"counter": {"name": "old"}}])
        t.apply(spec)
        print(json.dumps(sorted(next(iter(o)) + ":" + o[next(iter(o))].get("name", "")
                                for o in t.list() if "rule" not in o)))
    """)
    assert result == ["chain:input", "counter:dropped", "table:owned"]


def test_a_failed_apply_changes_nothing_and_says_why(ns):
    result = in_ns(ns, """
        t = Table("ip6", "owned")
        t.apply(spec)
        before = t.list()
        try:
            t.apply(spec + [{"rule": {"chain": "nochain", "expr": [{"accept": None}]}}])
            error = None
        except NftablesError as exc:
            error = [str(exc), exc.errno]
        print(json.dumps([error, t.list() == before]))
    """)
    assert result == [["nftables: Could not process rule: No such file or directory", 2], True]


def test_other_tables_are_left_alone(ns):
    subprocess.run(["ip", "netns", "exec", ns, "nft", "add", "table", "ip6", "someone"],
                   check=True)
    in_ns(ns, """
        t = Table("ip6", "owned")
        t.apply(spec)
        t.delete()
        print("null")
    """)
    assert nft_tables(ns) == ["ip6 someone"]


def test_there_is_never_a_moment_without_the_rules(ns):
    """Traffic is sent at a dropped port while the table is replaced 300 times; had the table
    ever been missing or empty, some of it would have arrived."""
    result = in_ns(ns, """
        import socket, threading
        t = Table("ip6", "owned")
        t.apply(spec)
        rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        rx.bind(("::1", 9999))
        rx.setblocking(False)
        tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        done = threading.Event()
        sent = 0
        def blast():
            global sent
            while not done.is_set():
                tx.sendto(b"x", ("::1", 9999))
                sent += 1
        sender = threading.Thread(target=blast)
        sender.start()
        for _ in range(300):
            t.apply(spec)
        done.set()
        sender.join()
        received = 0
        try:
            while True:
                rx.recv(16)
                received += 1
        except BlockingIOError:
            pass
        print(json.dumps([sent, received]))
    """, timeout=120)
    sent, received = result
    assert sent > 1000
    assert received == 0
