"""``BRSKI_DTLS_KEYLOG=<file>``: a debugging aid that writes DTLS session secrets to a file.

Off unless the variable is set. With it, every DTLS session this process's ``coaps_io`` contexts
open or accept appends NSS key log lines (the SSLKEYLOGFILE format) to the file, so a packet
capture of the link can be decrypted, e.g. ``tshark -o tls.keylog_file:<file>`` (tshark's DTLS
dissector uses the TLS key log preference). Anyone with the file can read the sessions:
never set it in production.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable

from brski.dtls import DtlsConfig

ENV = "BRSKI_DTLS_KEYLOG"

log = logging.getLogger(__name__)
_lock = threading.Lock()


def file_writer(path: str) -> Callable[[bytes], None]:
    def write(line: bytes) -> None:
        with _lock, open(path, "ab") as out:  # opened each time: the file may be rotated away
            out.write(line + b"\n")
    return write


def with_env_keylog(config: DtlsConfig) -> DtlsConfig:
    """``config`` with a key log writer if ``BRSKI_DTLS_KEYLOG`` names a file."""
    path = os.environ.get(ENV)
    if not path or config.keylog is not None:
        return config
    log.warning("%s is set: DTLS session secrets are written to %s (debugging only)", ENV, path)
    return dataclasses.replace(config, keylog=file_writer(path))
