"""brski/sztp.py's RESTCONF bodies against the published YANG modules (tests/yang/, RFC 8572
and RFC 8040 as data), validated by libyang's yanglint (Debian libyang2-tools): what we encode
validates, and what our decoder refuses, libyang refuses too.

yanglint validates RPC input (``-t rpc``) and output (``-t reply``); it has no input type
for a yang-data instance (ietf-sztp-conveyed-info's ``rc:yang-data``), so for conveyed
information only the module itself is checked here (the data's rules are brski/sztp.py's,
tested in test_sztp_wire.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from brski import sztp
from brski.errors import ProtocolError

YANG = Path(__file__).resolve().parent / "yang"
SERVER = "ietf-sztp-bootstrap-server@2019-04-30.yang"
MODULES = sorted(p.name for p in YANG.glob("*.yang"))


def yanglint(*args: str, data: bytes | None = None, suffix: str = ".json",
             tmp: Path | None = None) -> subprocess.CompletedProcess:
    argv = ["yanglint", "-p", str(YANG), *args]
    if data is not None:
        assert tmp is not None
        path = tmp / f"data{suffix}"
        path.write_bytes(data)
        argv.append(str(path))
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def as_rpc(body: bytes, encoding: str, rpc: str) -> bytes:
    """A RESTCONF body (RFC 8040 §3.6.1: "module:input"/"module:output" wrapper) as the
    RPC-named tree yanglint takes."""
    if encoding == "json":
        ((_, inner),) = json.loads(body).items()
        return json.dumps({f"{sztp.MOD_SERVER}:{rpc}": inner}).encode()
    text = body.decode()
    for wrapper in ("input", "output"):
        text = text.replace(f"<{wrapper} ", f"<{rpc} ").replace(f"</{wrapper}>", f"</{rpc}>")
        text = text.replace(f"<{wrapper}>", f"<{rpc}>").replace(f"<{wrapper} />",
                                                                f"<{rpc} />")
    return text.encode()


@pytest.mark.parametrize("module", MODULES)
def test_the_modules_compile(module: str) -> None:
    done = yanglint(str(YANG / module))
    assert done.returncode == 0, done.stderr


INPUTS = [
    sztp.GetBootstrappingDataInput(),
    sztp.GetBootstrappingDataInput(True, nonce=bytes(32)),
    sztp.GetBootstrappingDataInput(False, "model-x", "SimOS", "1.0", bytes(16)),
]
OUTPUTS = [
    sztp.GetBootstrappingDataOutput(b"\x30\x00"),
    sztp.GetBootstrappingDataOutput(b"ci", b"oc", b"ov", "verbose"),
]
REPORTS = [*(sztp.ReportProgressInput(kind, "m") for kind in sztp.PROGRESS_TYPES),
           sztp.ReportProgressInput("bootstrap-complete", None, (b"ta1", b"ta2"),
                                    (("ssh-ed25519", b"key"),))]


@pytest.mark.parametrize("encoding", ["json", "xml"])
def test_what_we_encode_validates(encoding: str, tmp_path: Path) -> None:
    suffix = f".{encoding}"
    for inp in INPUTS:
        body = inp.encode(encoding)
        done = yanglint("-t", "rpc", str(YANG / SERVER),
                        data=as_rpc(body, encoding, "get-bootstrapping-data"),
                        suffix=suffix, tmp=tmp_path)
        assert done.returncode == 0, (inp, done.stderr)
    for report in REPORTS:
        done = yanglint("-t", "rpc", "-F", f"{sztp.MOD_SERVER}:onboarding-server",
                        str(YANG / SERVER),
                        data=as_rpc(report.encode(encoding), encoding, "report-progress"),
                        suffix=suffix, tmp=tmp_path)
        assert done.returncode == 0, (report, done.stderr)
    for out in OUTPUTS:
        done = yanglint("-t", "reply", "-F", f"{sztp.MOD_SERVER}:onboarding-server",
                        str(YANG / SERVER),
                        data=as_rpc(out.encode(encoding), encoding, "get-bootstrapping-data"),
                        suffix=suffix, tmp=tmp_path)
        assert done.returncode == 0, (out, done.stderr)


REFUSED = [
    ("get-bootstrapping-data", {"nonce": "AAAA"}),  # 3 bytes
    ("get-bootstrapping-data", {"nonce": "A" * 60}),  # 45 bytes
    ("get-bootstrapping-data", {"serial-number": "x"}),
    ("get-bootstrapping-data", {"signed-data-preferred": True}),
    ("report-progress", {"progress-type": "done"}),
    ("report-progress", {"message": "no type"}),
    ("report-progress", {"progress-type": "informational",
                         "trust-anchor-certs": {"trust-anchor-cert": ["AAAA"]}}),
]


@pytest.mark.parametrize(("rpc", "inner"), REFUSED)
def test_what_we_refuse_libyang_refuses(rpc: str, inner: dict, tmp_path: Path) -> None:
    body = json.dumps({f"{sztp.MOD_SERVER}:input": inner}).encode()
    decoder = (sztp.GetBootstrappingDataInput if rpc == "get-bootstrapping-data"
               else sztp.ReportProgressInput)
    with pytest.raises(ProtocolError):
        decoder.decode(body, "json")
    done = yanglint("-t", "rpc", "-F", f"{sztp.MOD_SERVER}:onboarding-server",
                    str(YANG / SERVER), data=as_rpc(body, "json", rpc), tmp=tmp_path)
    assert done.returncode != 0, f"libyang accepted {inner}"


def test_an_owner_certificate_without_voucher_is_refused_by_both(tmp_path: Path) -> None:
    inner = {"conveyed-information": "AAAA", "owner-certificate": "AAAA"}
    body = json.dumps({f"{sztp.MOD_SERVER}:output": inner}).encode()
    with pytest.raises(ProtocolError):
        sztp.GetBootstrappingDataOutput.decode(body, "json")
    done = yanglint("-t", "reply", str(YANG / SERVER),
                    data=as_rpc(body, "json", "get-bootstrapping-data"), tmp=tmp_path)
    assert done.returncode != 0
