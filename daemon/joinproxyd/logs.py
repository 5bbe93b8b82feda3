"""Logging: structured journald records under systemd, plain lines on stderr otherwise.

Relay code passes fields such as INTERFACE, MODE, REGISTRAR, PLEDGE and REASON in `extra=`;
the journal keeps them as fields (`journalctl -u joinproxyd INTERFACE=join0`), and the stderr
format shows them after the message.
"""

import logging
import os
import sys

from brski.cli import quiet

FIELDS = ("INTERFACE", "MODE", "REGISTRAR", "PLEDGE", "REASON")

# JOINPROXYD_DEBUG_LIBRARIES=pyroute2,zeroconf (or "all"): those follow daemon.log_level;
# every other library logs warnings and errors only (brski.cli.quiet says why).
LIBRARY_ENV = "JOINPROXYD_DEBUG_LIBRARIES"


def quiet_libraries(handlers: list[logging.Handler] | None = None) -> tuple[str, ...]:
    """Hold the libraries at WARNING but those the environment names; again after
    importing pyroute2 (it resets its logger's level). Returns the names held."""
    handlers = logging.getLogger().handlers if handlers is None else handlers
    return quiet.hold(handlers, quiet.wanted_loud(os.environ.get(LIBRARY_ENV, "")))


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
    quiet_libraries([handler])
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(name)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
