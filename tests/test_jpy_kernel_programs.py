"""The JPY relay's tc programs (ebpf/jpy.bpf.c) through BPF_PROG_TEST_RUN, against the
Python implementation of the same header (brski.jpy.BlockHeaderSealer) and CBOR framing
(brski.jpy.JpyMessage): wrap every content size up to the limit, unwrap, refuse forged, stale
and truncated replies (counted), and a fuzzed stream never yields a malformed packet.

Nothing is attached: test runs on the loopback device (ifindex 1) of the test's namespace.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from ipaddress import IPv6Address

import cbor2
import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from brski.jpy import BlockHeaderSealer, JpyMessage, PledgeEndpoint
from joinproxyd.kernel import KernelError
from joinproxyd.kernel.bpf import BpfDatapath
from joinproxyd.kernel.bpf_layout import JP_JPY_MAX_CONTENT, JpyCfgC, JpyLinkC, Program

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
LINK = 1  # loopback: a test run's skb->ifindex
JOIN_LL, PLEDGE = "fe80::aa", "fe80::1:2:3:4"
BACKBONE, REGISTRAR = "fd00:bb::1", "fd00:bb::100"
JOIN_PORT, SRC_PORT, REG_PORT, PLEDGE_PORT = 5684, 40001, 7634, 50123
MAC = "02:00:00:00:00:03"
KEY, KEY2 = bytes(range(32)), bytes(range(100, 132))


@pytest.fixture(scope="module")
def dp() -> Iterator[BpfDatapath]:
    datapath = BpfDatapath.open(pin_dir=None, objects=("jpy",))
    cfg = JpyCfgC(backbone_ifindex=LINK, current_slot=0, src_port=SRC_PORT,
                  registrar_port=REG_PORT, max_content=JP_JPY_MAX_CONTENT)
    cfg.backbone_addr[:] = IPv6Address(BACKBONE).packed
    cfg.registrar_addr[:] = IPv6Address(REGISTRAR).packed
    link = JpyLinkC(port=JOIN_PORT, relay=1)
    link.addr[:] = IPv6Address(JOIN_LL).packed
    datapath.set_jpy(cfg, {LINK: link})
    datapath.set_jpy_key(0, 9, KEY)
    datapath.set_jpy_key(1, 8, KEY2)  # the previous key
    yield datapath
    datapath.close()


def sealer() -> BlockHeaderSealer:
    s = BlockHeaderSealer(KEY2, 8)
    s.rotate(KEY, 9)
    return s


def pledge_frame(content: bytes, src: str = PLEDGE, sport: int = PLEDGE_PORT) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IPv6(src=src, dst=JOIN_LL, hlim=255) / UDP(sport=sport, dport=JOIN_PORT)
                 / Raw(content))


def reply_frame(payload: bytes) -> bytes:
    return bytes(Ether(src=MAC, dst=MAC) / IPv6(src=REGISTRAR, dst=BACKBONE)
                 / UDP(sport=REG_PORT, dport=SRC_PORT) / Raw(payload))


def checksum_ok(frame: bytes) -> bool:
    pkt = Ether(frame)
    got = pkt[UDP].chksum
    del pkt[UDP].chksum
    return Ether(bytes(pkt))[UDP].chksum == got


def well_formed(frame: bytes) -> IPv6:
    """The frame is Ethernet + IPv6 + UDP with lengths that agree and a right checksum."""
    pkt = Ether(frame)
    ip6 = pkt[IPv6]
    assert ip6.plen == len(frame) - 54, "IPv6 payload length disagrees with the frame"
    assert pkt[UDP].len == ip6.plen, "UDP length disagrees with IPv6"
    assert checksum_ok(frame), "UDP checksum wrong"
    return ip6


def test_wraps_every_content_size_with_a_right_checksum(dp: BpfDatapath) -> None:
    s = sealer()
    before = dp.jpy_stats()
    rng = random.Random(1)
    for size in range(JP_JPY_MAX_CONTENT + 1):
        content = rng.randbytes(size)
        rc, out = dp.test_run(Program.JPY_JOIN, pledge_frame(content))
        assert rc == TC_ACT_REDIRECT, size
        ip6 = well_formed(out)
        assert (str(ip6.src), str(ip6.dst)) == (BACKBONE, REGISTRAR)
        assert (ip6[UDP].sport, ip6[UDP].dport, ip6.hlim) == (SRC_PORT, REG_PORT, 64)
        msg = JpyMessage.decode(bytes(ip6[UDP].payload))  # strict CBOR: exact prefixes
        assert msg.content == content, size
        assert msg.encode() == bytes(ip6[UDP].payload), "not the preferred CBOR encoding"
        assert s.open(msg.header) == PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, LINK)
    after = dp.jpy_stats()
    assert after["up"] - before["up"] == JP_JPY_MAX_CONTENT + 1


def test_too_big_is_dropped_and_counted(dp: BpfDatapath) -> None:
    before = dp.jpy_stats()
    rc, _ = dp.test_run(Program.JPY_JOIN, pledge_frame(bytes(JP_JPY_MAX_CONTENT + 1)))
    assert rc == TC_ACT_SHOT
    assert dp.jpy_stats()["too-big"] == before["too-big"] + 1


def test_not_ours_passes_untouched(dp: BpfDatapath) -> None:
    for frame in (pledge_frame(b"x", src="fd00::5"),  # not link-local: the daemon decides
                  bytes(Ether(src=MAC, dst=MAC) / IPv6(src=PLEDGE, dst=JOIN_LL)
                        / UDP(sport=1, dport=5683)),
                  bytes(Ether(src=MAC, dst=MAC) / IPv6(src=PLEDGE, dst="fe80::bb")
                        / UDP(dport=JOIN_PORT))):
        assert dp.test_run(Program.JPY_JOIN, frame)[0] == TC_ACT_OK


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 1000, JP_JPY_MAX_CONTENT])
def test_unwraps_a_reply_to_the_pledge_it_names(dp: BpfDatapath, size: int) -> None:
    s = sealer()
    pledge = PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, LINK)
    # sealed under the current key, and under the previous one
    for key_id_header in (s.seal(pledge), BlockHeaderSealer(KEY2, 8).seal(pledge)):
        content = os.urandom(size)
        rc, out = dp.test_run(Program.JPY_BACKBONE,
                              reply_frame(JpyMessage(key_id_header, content).encode()))
        assert rc == TC_ACT_REDIRECT
        ip6 = well_formed(out)
        assert (str(ip6.src), str(ip6.dst)) == (JOIN_LL, PLEDGE)
        assert (ip6[UDP].sport, ip6[UDP].dport) == (JOIN_PORT, PLEDGE_PORT)
        assert bytes(ip6[UDP].payload) == content


def reply_with(header: bytes, content: bytes = b"dtls") -> bytes:
    return reply_frame(JpyMessage(header, content).encode())


def test_forged_stale_and_truncated_replies_are_dropped_and_counted(dp: BpfDatapath) -> None:
    good = sealer().seal(PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, LINK))
    cases: list[tuple[str, bytes]] = []
    for i in range(1, 32):  # every byte but the key id, flipped
        bad = bytearray(good)
        bad[i] ^= 0x01
        cases.append(("forged", reply_with(bytes(bad))))
    cases.append(("forged", reply_with(bytes([9]) + os.urandom(31))))
    # another pledge's C block with this one's tag
    other = sealer().seal(PledgeEndpoint(IPv6Address("fe80::9"), PLEDGE_PORT, LINK))
    cases.append(("forged", reply_with(other[:17] + good[17:])))
    # a header sealed under a key the kernel does not hold, with a live id
    cases.append(("forged", reply_with(BlockHeaderSealer(os.urandom(32), 9).seal(
        PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, LINK)))))
    cases.append(("stale", reply_with(bytes([7]) + good[1:])))
    full = JpyMessage(good, bytes(300)).encode()
    for cut in (4, 20, 35, 36, 37, len(full) - 1):
        cases.append(("malformed", reply_frame(full[:cut])))
    cases.append(("malformed", reply_frame(full + b"\0")))  # bytes after the array
    for reason, frame in cases:
        before = dp.jpy_stats()
        rc, _ = dp.test_run(Program.JPY_BACKBONE, frame)
        after = dp.jpy_stats()
        assert rc == TC_ACT_SHOT, reason
        assert after[reason] == before[reason] + 1, reason
        assert after["down"] == before["down"]


def test_replies_the_kernel_does_not_parse_go_to_the_daemon(dp: BpfDatapath) -> None:
    good = sealer().seal(PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, LINK))
    for payload in (cbor2.dumps([good, b"x", 1]),  # three elements: the daemon decodes
                    b"\xa0", b"\x82\x41\x00\x40",  # a map; a 1-byte header
                    bytes.fromhex("825820") + good + bytes.fromhex("5800")):  # not preferred
        assert dp.test_run(Program.JPY_BACKBONE, reply_frame(payload))[0] == TC_ACT_OK
    # not from the registrar's JPY port: the daemon's socket counts it as unsolicited
    frame = bytes(Ether(src=MAC, dst=MAC) / IPv6(src=REGISTRAR, dst=BACKBONE)
                  / UDP(sport=1, dport=SRC_PORT) / Raw(JpyMessage(good, b"x").encode()))
    assert dp.test_run(Program.JPY_BACKBONE, frame)[0] == TC_ACT_OK


def test_reply_for_a_link_not_served_is_unsolicited(dp: BpfDatapath) -> None:
    header = sealer().seal(PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, 77))
    before = dp.jpy_stats()
    assert dp.test_run(Program.JPY_BACKBONE, reply_with(header))[0] == TC_ACT_SHOT
    assert dp.jpy_stats()["unsolicited"] == before["unsolicited"] + 1


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1:  # a test run needs an Ethernet header, as any frame has
            del data[rng.randrange(14, len(data) + 1):]
        elif op == 2:
            data += rng.randbytes(rng.randint(1, 40))
        elif len(data) > 62:  # lengths and CBOR prefix bytes, where parsers go wrong
            pos = rng.choice([18, 19, 58, 59, 60, 61, 62, 63, 64, 97, 98, 99])
            if pos < len(data):
                data[pos] = rng.randrange(256)
    return bytes(data)


def test_fuzzed_stream_never_yields_a_malformed_packet(dp: BpfDatapath) -> None:
    rng = random.Random(int(os.environ.get("BRSKI_FUZZ_SEED", "19")))
    s = sealer()
    header = s.seal(PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, LINK))
    seeds = [(Program.JPY_JOIN, pledge_frame(rng.randbytes(n))) for n in (0, 30, 300, 1194)]
    seeds += [(Program.JPY_BACKBONE, reply_with(header, rng.randbytes(n)))
              for n in (0, 30, 300, 1194)]
    verdicts = {TC_ACT_OK: 0, TC_ACT_SHOT: 0, TC_ACT_REDIRECT: 0}
    for _ in range(int(os.environ.get("BRSKI_FUZZ_EXAMPLES", "3000"))):
        program, seed = rng.choice(seeds)
        frame = mutate(rng, seed)
        try:
            rc, out = dp.test_run(program, frame)
        except KernelError as exc:
            # the test run itself refuses an IPv6 frame cut inside the IPv6 header
            assert exc.errno == errno.EINVAL and len(frame) < 54, frame.hex()
            continue
        assert rc in verdicts, (program, frame.hex())
        verdicts[rc] += 1
        if rc == TC_ACT_OK:
            assert out == frame, "a passed packet was modified"
        if rc != TC_ACT_REDIRECT:
            continue
        pkt = Ether(out)
        ip6 = pkt[IPv6]
        assert ip6.plen == len(out) - 54 and pkt[UDP].len == ip6.plen, frame.hex()
        # a right checksum in, a right one out (a wrong one stays wrong: the receiver drops)
        assert checksum_ok(out) == checksum_ok(frame), frame.hex()
        if program is Program.JPY_JOIN:
            msg = JpyMessage.decode(bytes(pkt[UDP].payload))
            assert s.open(msg.header).ifindex == LINK
            assert msg.content == bytes(Ether(frame)[UDP].payload)
        else:
            assert (str(ip6.src), pkt[UDP].sport) == (JOIN_LL, JOIN_PORT)
    assert all(verdicts.values()), verdicts  # the stream reached every verdict


def test_an_exact_copy_of_a_relayed_reply_is_dropped_as_replayed(dp: BpfDatapath) -> None:
    header = sealer().seal(PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT, LINK))
    record = b"\x17\xfe\xfd\x00\x01" + os.urandom(40)  # a DTLS record: epoch, sequence, ...
    frame = reply_with(header, record)
    before = dp.jpy_stats()
    assert dp.test_run(Program.JPY_BACKBONE, frame)[0] == TC_ACT_REDIRECT
    assert dp.test_run(Program.JPY_BACKBONE, frame)[0] == TC_ACT_SHOT
    # the next record of the same flow is not a replay
    assert dp.test_run(Program.JPY_BACKBONE, reply_with(header, record[:5] + os.urandom(40)))[0] \
        == TC_ACT_REDIRECT
    after = dp.jpy_stats()
    assert (after["replayed"] - before["replayed"], after["down"] - before["down"]) == (1, 2)
