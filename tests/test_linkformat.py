"""CoRE link-format discovery links: the drafts' examples both ways, and every rule."""

import time
from ipaddress import IPv4Address, IPv6Address

import pytest

from brski.errors import DecodeError, UsageError, ValidationError
from brski.linkformat import (
    MAX_LINKFORMAT_SIZE,
    JoinPortLink,
    RegistrarKind,
    RegistrarLink,
    format_links,
    parse_join_ports,
    parse_links,
    parse_registrars,
)

REGISTRAR = IPv6Address("2001:db8:0:abcd::52")

# Published examples (cBRSKI §10, join-proxy draft §5) and what they mean.
EXAMPLES = [
    ("<>;brski-jp=8485", [JoinPortLink(8485)]),
    ("<coaps://[2001:db8:0:abcd::52]/b>;rt=brski",
     [RegistrarLink(RegistrarKind.STATEFUL, REGISTRAR, 5684, "/b")]),
    ("<jpy://[2001:db8:0:abcd::52]:7634>;rt=brski.rjp",
     [RegistrarLink(RegistrarKind.STATELESS, REGISTRAR, 7634)]),
    ("<>;brski-jp=61616,<>;brski-jp=61617;var=\"c509 v2\"",
     [JoinPortLink(61616), JoinPortLink(61617, params=(("var", "c509 v2"),))]),
    ("<coaps://[fe80::1234:5678]:45965>;rt=brski.jp",
     [JoinPortLink(45965, IPv6Address("fe80::1234:5678"))]),
]


@pytest.mark.parametrize(("text", "links"), EXAMPLES)
def test_examples_parse_to_typed_links(text, links):
    assert parse_links(text) == links
    assert parse_links(text.encode()) == links


@pytest.mark.parametrize(("text", "links"), EXAMPLES)
def test_examples_are_emitted_byte_for_byte(text, links):
    assert format_links(links) == text


def test_quoted_port_and_spaces_after_commas_are_accepted():
    assert parse_join_ports('<>;brski-jp="63245"') == [JoinPortLink(63245)]
    text = "<>;brski-jp=57101, <>;brski-jp=57102;param1=value1;param2=value2"
    assert parse_join_ports(text) == [
        JoinPortLink(57101),
        JoinPortLink(57102, params=(("param1", "value1"), ("param2", "value2"))),
    ]


def test_legacy_quoted_rt_and_the_kind_property():
    (link,) = parse_links('<coaps://[fe80::1]:61616>;rt="brski.jp"')
    assert link == JoinPortLink(61616, IPv6Address("fe80::1"))
    assert link.legacy
    assert not JoinPortLink(61616).legacy


def test_legacy_link_without_port_means_coaps_default():
    assert parse_links("<coaps://[fe80::1]>;rt=brski.jp") == [
        JoinPortLink(5684, IPv6Address("fe80::1"))
    ]


def test_registrar_on_a_non_default_port_and_ipv4():
    links = parse_registrars(
        "<coaps://[2001:db8::1]:61617/brski>;rt=brski,<coaps://192.0.2.7/b>;rt=brski,"
        "<jpy://192.0.2.7:7634/ignored/path>;rt=brski.rjp"
    )
    assert links == [
        RegistrarLink("stateful", IPv6Address("2001:db8::1"), 61617, "/brski"),
        RegistrarLink("stateful", IPv4Address("192.0.2.7"), 5684, "/b"),
        RegistrarLink("stateless", IPv4Address("192.0.2.7"), 7634),  # jpy path ignored
    ]
    assert format_links(links) == (
        "<coaps://[2001:db8::1]:61617/brski>;rt=brski,<coaps://192.0.2.7/b>;rt=brski,"
        "<jpy://192.0.2.7:7634>;rt=brski.rjp"
    )
    assert links[0].kind == "stateful"


def test_other_links_are_skipped_and_order_kept():
    text = (
        "</sensors/temp>;rt=temperature;if=sensor,"
        "<jpy://[2001:db8:0:abcd::52]:7634>;rt=brski.rjp,"
        "</b/rv>;rt=brski.rv;ct=836,"
        "<coaps://[2001:db8:0:abcd::52]/b>;rt=brski,"
        "<>;brski-jp=8485"
    )
    assert [type(x).__name__ for x in parse_links(text)] == [
        "RegistrarLink", "RegistrarLink", "JoinPortLink"
    ]
    assert [x.kind for x in parse_registrars(text)] == ["stateless", "stateful"]
    assert parse_join_ports(text) == [JoinPortLink(8485)]


def test_empty_document_has_no_links():
    assert parse_links(b"") == []


def test_rt_with_several_types_keeps_ours():
    assert parse_links('<coaps://[2001:db8::1]/b>;rt="core.rd brski"') == [
        RegistrarLink("stateful", IPv6Address("2001:db8::1"), 5684, "/b")
    ]


def test_brski_jp_on_a_hosts_link_is_fine():
    assert parse_links("<>;rel=hosts;brski-jp=1") == [JoinPortLink(1, params=(("rel", "hosts"),))]


def test_emission_quotes_only_what_needs_it():
    link = JoinPortLink(9, params=(("title", 'say "hi"'), ("obs", None), ("sz", "12")))
    text = format_links([link])
    assert text == '<>;brski-jp=9;title="say \\"hi\\"";obs;sz=12'
    assert parse_links(text) == [link]


# --- malformed: DecodeError; well-formed but unusable: ValidationError ------------------------

MALFORMED = [
    "garbage",
    "<a",
    "<>;a=b=c",
    "<>,,<>",
    "<>;brski-jp=http",
    "<>;brski-jp=*",
    "<>;brski-jp=0",
    "<>;brski-jp=65536",
    "<>;brski-jp=-1",
    "<>;brski-jp=",
    '<>;brski-jp=""',
    "<>;brski-jp",
    "<>;brski-jp=1;brski-jp=2",
    "<>;rel=alternate;brski-jp=1",
    "<jpy://[2001:db8::1]>;rt=brski.rjp",  # jpy MUST carry a port
    "<jpy://[2001:db8::1]:0>;rt=brski.rjp",
    "<jpy://[2001:db8::1]:99999>;rt=brski.rjp",
    "<jpy://[2001:db8::1]:port>;rt=brski.rjp",
    "<coaps://[2001:db8::1]/b>;rt=brski.rjp",  # stateless needs the jpy scheme
    "<jpy://[2001:db8::1]:1>;rt=brski",  # stateful needs coaps
    "<coap://[2001:db8::1]/b>;rt=brski",
    "<https://[2001:db8::1]/b>;rt=brski",
    "</b>;rt=brski",  # relative: no address for the proxy
    "<coaps:///b>;rt=brski",
    "<coaps://[2001:db8::1/b>;rt=brski",
    "<coaps://[zz::1]/b>;rt=brski",
    "<coaps://user@[2001:db8::1]/b>;rt=brski",
    "<coaps://[192.0.2.1]/b>;rt=brski",
    "<coaps://[2001:db8::1]/b>;rt=brski;rt=brski",
    "<coaps://[2001:db8::1]/b>;rt",
    '<coaps://[2001:db8::1]/b>;rt="brski brski.rjp"',
    "<>;brski-jp=1" + " " * 17 + ",<>;brski-jp=2",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_links_are_decode_errors(text):
    with pytest.raises(DecodeError):
        parse_links(text)


@pytest.mark.parametrize(
    "text",
    [
        "<coaps://registrar.example/b>;rt=brski",
        "<jpy://registrar.example:7634>;rt=brski.rjp",
        "<coaps://[fe80::1%25eth0]/b>;rt=brski",
    ],
)
def test_links_a_proxy_cannot_use_are_validation_errors(text):
    with pytest.raises(ValidationError):
        parse_links(text)


def test_non_utf8_and_oversized_documents():
    with pytest.raises(DecodeError, match="UTF-8"):
        parse_links(b"<>;brski-jp=\xff")
    with pytest.raises(DecodeError, match="too long"):
        parse_links(b"<>;brski-jp=1," * (MAX_LINKFORMAT_SIZE // 13 + 1))
    with pytest.raises(DecodeError, match="too long"):
        parse_links("x" * (MAX_LINKFORMAT_SIZE + 1))


def test_unterminated_target_with_spaces_is_quick():
    """aiocoap's link regex backtracks on '<' + spaces without '>': refused up front."""
    start = time.perf_counter()
    for text in ("<" + " " * 8000, "<" + (" " * 16 + "a") * 470):
        with pytest.raises(DecodeError):
            parse_links(text)
    assert time.perf_counter() - start < 1.0


def test_parse_takes_bytes_or_str():
    with pytest.raises(UsageError):
        parse_links(["<>;brski-jp=1"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: JoinPortLink(0),
        lambda: JoinPortLink(65536),
        lambda: JoinPortLink("1"),  # type: ignore[arg-type]
        lambda: JoinPortLink(1, "fe80::1"),  # type: ignore[arg-type]
        lambda: RegistrarLink("proxy", REGISTRAR, 1),
        lambda: RegistrarLink("stateful", "2001:db8::1", 1),  # type: ignore[arg-type]
        lambda: RegistrarLink("stateful", REGISTRAR, 0),
        lambda: RegistrarLink("stateful", REGISTRAR, 1, "b"),
        lambda: format_links(["<>;brski-jp=1"]),  # type: ignore[list-item]
    ],
)
def test_constructors_and_format_check_their_arguments(build):
    with pytest.raises(UsageError):
        build()
