"""Logging: structured journald records under systemd, plain lines on stderr otherwise.

Relay code passes fields such as INTERFACE, MODE, REGISTRAR, PLEDGE and REASON in `extra=`;
the journal keeps them as fields (`journalctl -u joinproxyd INTERFACE=join0`), and the stderr
format shows them after the message.
"""

import logging
import os
import sys

FIELDS = ("INTERFACE", "MODE", "REGISTRAR", "PLEDGE", "REASON")


class _FieldsFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name.lower()}={getattr(record, name)}" for name in FIELDS
                  if hasattr(record, name)]
        return f"{line} [{' '.join(fields)}]" if fields else line


def under_journal() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(level: str, name: str = "joinproxyd") -> logging.Logger:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    journal = None
    if under_journal():
        try:  # python3-systemd: optional, stderr reaches the journal as plain lines too
            from systemd.journal import JournalHandler

            journal = JournalHandler(SYSLOG_IDENTIFIER=name)
        except ImportError:
            journal = None
    if journal is not None:
        handler = journal
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(name)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
