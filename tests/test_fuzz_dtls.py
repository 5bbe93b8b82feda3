"""Fuzzing brski.dtls: mutated handshake and application datagrams never crash a session.

The contract (brski/errors.py): whatever a peer sends, the server's accept() returns a verdict
and a session's receive() returns records or raises a ProtocolError subclass, nothing else.
"""

import datetime

import pytest
from fuzzkit import decoded_or_none, fuzz_settings, mutated
from hypothesis import given
from hypothesis import strategies as st

from brski.dtls import DtlsConfig, DtlsServer, DtlsSession
from brski.pki import create_test_pki

fuzz = fuzz_settings(60)
PEER = b"[2001:db8::1]:5683"


@pytest.fixture(scope="module")
def world():
    """A server, and the datagrams of one real handshake and one application record."""
    pki = create_test_pki(datetime.datetime.now(datetime.UTC), serials=["F1"])
    server_config = DtlsConfig(pki.registrar.cert, pki.registrar.key, [pki.manufacturer_ca.cert])
    client_config = DtlsConfig(pki.idevids["F1"].cert, pki.idevids["F1"].key,
                               [pki.domain_ca.cert])
    server = DtlsServer(server_config)
    client = DtlsSession.client(client_config)
    (hello,) = client.datagrams_to_send()
    client.receive(server.accept(PEER, hello, 0.0).replies[0])
    (hello2,) = client.datagrams_to_send()
    accepted = server.accept(PEER, hello2, 0.0)
    server_flight = accepted.replies
    session = accepted.session
    for datagram in server_flight:
        client.receive(datagram)
    client_flight = client.datagrams_to_send()
    for datagram in client_flight:
        session.receive(datagram)
    for datagram in session.datagrams_to_send():
        client.receive(datagram)
    client.send(b"\x40\x01\x00\x01")
    (app,) = client.datagrams_to_send()
    return {"server": server, "client_config": client_config, "session": session,
            "hellos": [hello, hello2], "server_flight": server_flight,
            "client_flight": client_flight, "app": app}


@fuzz
@given(data=st.data())
def test_mutated_client_hellos_get_a_verdict(world, data):
    datagram = data.draw(mutated(world["hellos"] + world["client_flight"]))
    accepted = world["server"].accept(PEER, datagram, 0.0)
    assert accepted.session is not None or accepted.drop in ("no-cookie", "garbage",
                                                             "handshake-failed")


@fuzz
@given(data=st.data())
def test_mutated_server_flights_never_crash_a_client(world, data):
    client = DtlsSession.client(world["client_config"])
    datagram = data.draw(mutated(world["server_flight"]))
    decoded_or_none(client.receive, datagram)


@fuzz
@given(data=st.data())
def test_mutated_records_never_crash_an_established_session(world, data):
    session = world["session"]
    if session.closed:  # a mutation may have been a valid alert; that is a clean end too
        return
    datagram = data.draw(mutated([world["app"], *world["client_flight"]]))
    decoded_or_none(session.receive, datagram)


@fuzz
@given(datagram=st.binary(max_size=400))
def test_arbitrary_bytes_to_the_server(world, datagram):
    accepted = world["server"].accept(PEER, datagram, 0.0)
    assert accepted.session is None or accepted.drop is None
