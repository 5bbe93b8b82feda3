"""Writes tests/data/store-v1-{registrar,masa}.db with the store code of release schema 1
(run once, at the commit before schema 2, from the repository root; kept for the record of
how the fixtures were made): every table, with blobs, NULLs and a JRC pledge."""

import datetime
import sys
from pathlib import Path

from registrar.cojp_store import CojpStore
from registrar.store import SCHEMA_VERSION, Store

assert SCHEMA_VERSION == 1, "run this with the schema-1 store code"
out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
NOT_AFTER = datetime.datetime(2027, 5, 1, tzinfo=datetime.UTC)

reg_path = out / "store-v1-registrar.db"
reg_path.unlink(missing_ok=True)
with Store(reg_path, "registrar") as s:
    for i in range(3):
        serial = f"V1-SN{i}"
        s.pledge_seen(serial, bytes([i]) * 40, "voucher-requested")
        rid = s.add_voucher_request(serial, bytes([i]) * 32, b"pvr%d" % i, b"rvr%d" % i,
                                    f"nonce{i}", "pending", "MASA unreachable: test")
        if i < 2:
            s.add_voucher(serial, b"voucher%d" % i, request_id=rid, assertion="proximity",
                          nonce=f"nonce{i}", domain_id="dom")
            s.add_telemetry(serial, "voucher_status", b'{"s":1}', version=1, status=True,
                            reason=None, client_cert_matches=True)
            s.add_certificate(f"{0xabc0 + i:x}", serial, f"CN=x{i}", b"der%d" % i, NOT_AFTER)
            s.add_telemetry(serial, "enrollstatus", b"{}", version=None, status=None,
                            reason="r", client_cert_matches=False)
        else:
            s.update_voucher_request(rid, "refused", "no")
    s.audit("operator-note", None, note="written by schema 1")
    jrc = CojpStore(s)
    jrc.add_pledge(b"\x01\x02", b"k" * 16)
    jrc.add_pledge(b"\x03", None, edhoc_kid=b"\x2b", edhoc_credential=b"ccs")
    jrc.save_window(b"\x01\x02", 7, 0xFFFFFFFF)
    jrc.reserve_ssn(b"\x01\x02", 64)
    jrc.save_join(b"\x01\x02", b"\x07", b"h" * 32, b"resp", b"\xaa", 1)

masa_path = out / "store-v1-masa.db"
masa_path.unlink(missing_ok=True)
with Store(masa_path, "masa") as s:
    s.add_voucher("V1-SN0", b"masa-voucher", assertion="proximity", nonce="n0",
                  domain_id="dom")
    s.claim_owner("V1-SN0", b"A" * 32, b"domain-cert")
    s.audit("audit-log-request", "V1-SN0", domain="dom")
