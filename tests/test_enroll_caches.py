"""What the enrollment path keeps between requests, and when it must let go (issue 18 item 1).

* the registrar's client classification: the name check that spares an IDevID the domain CA's
  path check, over brski.chain's table of validated paths: a changed, rotated or removed
  trust anchor is another answer at once;
* the pledge's IDevID TLS context, shared by its provisional and pinned connections: its
  trust store holds the current pin and nothing else, also after the pin changes;
* the registrar's group commit (registrar.store_commit): answers only after the commit,
  one job's failure is its own, the store's transactions nest as savepoints.
"""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from brski.pki import create_test_pki
from pledge_sim import runner as runner_module
from pledge_sim.identity import PledgeIdentity, load_identity
from pledge_sim.runner import PledgeRunner, Settings
from pledge_sim.session import Trust
from pledge_sim.voucher_check import AcceptedVoucher
from registrar.identity import Kind, classify
from registrar.store import Store, StoreError
from registrar.store_commit import GroupCommitter
from registrar.web import Refusal

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def pkis():
    """Two PKIs with the same names and other keys: the second domain CA is the first one
    re-keyed (or an impostor with its name)."""
    return (create_test_pki(NOW, serials=["cache-1"]), create_test_pki(NOW, serials=["cache-1"]))


# -- the registrar's classification ----------------------------------------------------------

def test_an_idevid_and_an_ldevid_are_told_apart(pkis):
    pki = pkis[0]
    idevid = pki.idevids["cache-1"].cert
    ldevid = pki.registrar.cert  # issued by the domain CA, as an LDevID is
    for _ in range(2):  # the second time from the table of validated paths
        client = classify([idevid], [pki.manufacturer_ca.cert], pki.domain_ca.cert, NOW)
        assert client is not None and client.kind is Kind.IDEVID and client.serial == "cache-1"
        client = classify([ldevid], [pki.manufacturer_ca.cert], pki.domain_ca.cert, NOW)
        assert client is not None and client.kind is Kind.LDEVID


def test_a_rekeyed_domain_ca_of_the_same_name_no_longer_vouches_for_old_ldevids(pkis):
    old, new = pkis
    ldevid = old.registrar.cert
    assert classify([ldevid], [old.manufacturer_ca.cert], old.domain_ca.cert, NOW).kind \
        is Kind.LDEVID
    # Same issuer name, so the name check lets it through to the path check, which fails:
    # and the path validated under the old key is not reused.
    with pytest.raises(Refusal) as refused:
        classify([ldevid], [old.manufacturer_ca.cert], new.domain_ca.cert, NOW)
    assert refused.value.status == 403


def test_a_removed_or_replaced_manufacturer_ca_refuses_its_idevids(pkis):
    old, new = pkis
    idevid = old.idevids["cache-1"].cert
    assert classify([idevid], [old.manufacturer_ca.cert], old.domain_ca.cert, NOW).kind \
        is Kind.IDEVID
    with pytest.raises(Refusal):
        classify([idevid], [new.manufacturer_ca.cert], old.domain_ca.cert, NOW)
    with pytest.raises(Refusal):  # no manufacturer CA left at all
        classify([idevid], [], old.domain_ca.cert, NOW)
    assert classify([], [old.manufacturer_ca.cert], old.domain_ca.cert, NOW) is None


def test_a_certificate_valid_before_is_refused_once_expired(pkis):
    pki = pkis[0]
    ldevid = pki.registrar.cert
    assert classify([ldevid], [], pki.domain_ca.cert, NOW).kind is Kind.LDEVID
    later = ldevid.not_valid_after_utc + datetime.timedelta(seconds=1)
    with pytest.raises(Refusal):
        classify([ldevid], [], pki.domain_ca.cert, later)


# -- the pledge's TLS contexts ----------------------------------------------------------------

def _identity(pki, tmp_path: Path) -> PledgeIdentity:
    issued = pki.idevids["cache-1"]
    cert, key = tmp_path / "idevid.crt", tmp_path / "idevid.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    return load_identity(cert, key)


def _pinned(runner: PledgeRunner, cert) -> None:
    """As if a voucher pinning ``cert`` had been accepted (only the pin matters here)."""
    runner.session.accepted = AcceptedVoucher(voucher=None, signer=cert, pinned=cert)


def _anchors(ctx: ssl.SSLContext) -> list[bytes]:
    return [c for c in ctx.get_ca_certs(binary_form=True)]


def _der(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_the_idevid_context_holds_the_current_pin_and_only_it(pkis, tmp_path):
    old, new = pkis
    runner = PledgeRunner(_identity(old, tmp_path), [], Settings(anchors=[], out_dir=tmp_path))
    provisional = runner._context(Trust.PROVISIONAL)
    assert provisional.verify_mode is ssl.CERT_NONE and _anchors(provisional) == []
    _pinned(runner, old.domain_ca.cert)
    pinned = runner._context(Trust.PINNED)
    assert pinned is provisional  # one context, one key loading
    assert pinned.verify_mode is ssl.CERT_REQUIRED
    assert pinned.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    assert _anchors(pinned) == [_der(old.domain_ca.cert)]
    # Back to provisional (a voucher refused later, a reset): nothing is verified again...
    assert runner._context(Trust.PROVISIONAL).verify_mode is ssl.CERT_NONE
    # ...and the same pin again reuses the context, verifying once more.
    again = runner._context(Trust.PINNED)
    assert again is pinned and again.verify_mode is ssl.CERT_REQUIRED
    assert _anchors(again) == [_der(old.domain_ca.cert)]
    # A new voucher pinning another certificate: a fresh context, the old pin not in it.
    _pinned(runner, new.domain_ca.cert)
    changed = runner._context(Trust.PINNED)
    assert changed is not pinned
    assert _anchors(changed) == [_der(new.domain_ca.cert)]


def test_a_pinned_context_refuses_a_registrar_outside_the_pin(pkis, tmp_path):
    """The shared context still verifies: a registrar certificate from the re-keyed domain
    CA fails the pinned handshake (in memory, no sockets)."""
    old, new = pkis
    runner = PledgeRunner(_identity(old, tmp_path), [], Settings(anchors=[], out_dir=tmp_path))
    runner._context(Trust.PROVISIONAL)
    _pinned(runner, old.domain_ca.cert)
    client = runner._context(Trust.PINNED)
    for pki, ok in ((old, True), (new, False)):
        (tmp_path / "r.crt").write_bytes(pki.registrar.cert_pem() + pki.domain_ca.cert_pem())
        (tmp_path / "r.key").write_bytes(pki.registrar.key_pem())
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(tmp_path / "r.crt", tmp_path / "r.key")
        if ok:
            _handshake(client, server)
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                _handshake(client, server)


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
    to_client, from_client, to_server, from_server = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(to_client, from_client, server_hostname=None)
    server = server_ctx.wrap_bio(to_server, from_server, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            to_server.write(from_client.read())
            to_client.write(from_server.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_cacerts_is_written_again_when_changed_or_gone(tmp_path):
    path = tmp_path / "cacerts.pem"
    runner_module._write_shared(path, b"one")
    path.write_bytes(b"edited by someone")
    runner_module._write_shared(path, b"one")  # the same content again: not rewritten
    assert path.read_bytes() == b"edited by someone"
    runner_module._write_shared(path, b"two")
    assert path.read_bytes() == b"two"
    path.unlink()
    runner_module._write_shared(path, b"two")
    assert path.read_bytes() == b"two"


# -- the group commit -------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "r.db"
    return request.getfixturevalue("pg_url")


def test_nested_transactions_are_savepoints(target):
    with Store(target, "registrar") as store:
        with store.transaction():
            store.pledge_seen("kept", None, "seen")
            with pytest.raises(RuntimeError), store.transaction():
                store.pledge_seen("undone", None, "seen")
                raise RuntimeError("this job fails")
            store.pledge_seen("kept-too", None, "seen")
        assert store.pledge("kept") and store.pledge("kept-too")
        assert store.pledge("undone") is None


def test_jobs_share_commits_and_answer_after_them(target):
    Store(target, "registrar").close()
    seen_by_reader: list[bool] = []

    async def main() -> list[object]:
        with GroupCommitter(target) as committer, Store(target, "registrar") as reader:
            async def one(i: int) -> object:
                serial = f"p-{i}"
                result = await committer.run(lambda s: s.pledge_seen(serial, None, "seen") or i)
                # Answered: committed, so another connection sees it.
                seen_by_reader.append(reader.pledge(serial) is not None)
                return result

            results = await asyncio.gather(*(one(i) for i in range(40)))
            assert committer.jobs == 40 and committer.batches < 40  # some shared a commit
            return results

    assert asyncio.run(main()) == list(range(40))
    assert seen_by_reader == [True] * 40


def test_a_failing_job_takes_only_its_own_writes_back(target):
    Store(target, "registrar").close()
    gate = threading.Event()

    def blocker(store: Store) -> None:
        gate.wait(5)  # holds the thread so that the next jobs form one batch

    def bad(store: Store) -> None:
        store.pledge_seen("bad", None, "seen")
        raise ValueError("refused")

    async def main() -> None:
        with GroupCommitter(target) as committer:
            first = asyncio.ensure_future(committer.run(blocker))
            await asyncio.sleep(0.05)
            jobs = [committer.run(lambda s: s.pledge_seen("good-1", None, "seen")),
                    committer.run(bad),
                    committer.run(lambda s: s.pledge_seen("good-2", None, "seen"))]
            tasks = [asyncio.ensure_future(j) for j in jobs]
            await asyncio.sleep(0.05)
            gate.set()
            await first
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert results[0] is None and results[2] is None
            assert isinstance(results[1], ValueError) and str(results[1]) == "refused"
            assert committer.batches == 2

    asyncio.run(main())
    with Store(target, "registrar") as store:
        assert store.pledge("good-1") and store.pledge("good-2")
        assert store.pledge("bad") is None


def test_a_store_of_the_wrong_role_fails_at_start_and_a_closed_one_refuses(tmp_path):
    Store(tmp_path / "m.db", "masa").close()
    with pytest.raises(StoreError):
        GroupCommitter(tmp_path / "m.db", "registrar")
    committer = GroupCommitter(tmp_path / "r.db", "registrar")
    committer.close()
    with pytest.raises(RuntimeError):
        asyncio.run(committer.run(lambda s: None))


def test_a_job_the_database_refused_in_a_shared_batch_runs_again_alone(tmp_path):
    """A statement refused inside a batch (on PostgreSQL, two registrars' batches deadlocked
    on each other's locks) is the batch's doing: the job gets a transaction of its own."""
    target = tmp_path / "r.db"
    Store(target, "registrar").close()
    gate = threading.Event()
    calls = []

    def flaky(store: Store) -> str:
        calls.append(len(calls))
        store.pledge_seen("flaky", None, "seen")
        if len(calls) == 1:
            raise sqlite3.OperationalError("deadlock detected (as PostgreSQL would say)")
        return "done"

    async def main() -> list[object]:
        with GroupCommitter(target) as committer:
            first = asyncio.ensure_future(committer.run(lambda s: gate.wait(5)))
            await asyncio.sleep(0.05)
            tasks = [asyncio.ensure_future(committer.run(flaky)),
                     asyncio.ensure_future(committer.run(
                         lambda s: s.pledge_seen("other", None, "seen")))]
            await asyncio.sleep(0.05)
            gate.set()
            await first
            return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == ["done", None]
    assert calls == [0, 1]
    with Store(target, "registrar") as store:
        assert store.pledge("flaky") and store.pledge("other")
