"""Logging: structured journald records under systemd, plain lines on stderr otherwise.

Relay code passes fields such as INTERFACE, MODE, REGISTRAR, PLEDGE and REASON in `extra=`;
the journal keeps them as fields (`journalctl -u joinproxyd INTERFACE=join0`), and the stderr
format shows them after the message.
"""

import logging
import os
import sys

FIELDS = ("INTERFACE", "MODE", "REGISTRAR", "PLEDGE", "REASON")

# Libraries whose debug output (pyroute2 dumps every netlink message) would drown the
# daemon's own lines: they log at WARNING and above unless the environment names them.
LIBRARIES = ("pyroute2", "asyncio", "zeroconf", "aiohttp", "aiocoap", "urllib3")
LIBRARY_FLOOR = logging.WARNING
# JOINPROXYD_DEBUG_LIBRARIES=pyroute2,zeroconf (or "all"): those follow daemon.log_level.
LIBRARY_ENV = "JOINPROXYD_DEBUG_LIBRARIES"


class _LibraryFloor(logging.Filter):
    """Drops library records below WARNING at the handler: pyroute2 resets its logger's
    level when imported, so a logger level alone does not hold."""

    def __init__(self, quiet: tuple[str, ...]) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= LIBRARY_FLOOR:
            return True
        name = record.name
        return not any(name == q or name.startswith(q + ".") for q in self.quiet)


def quiet_libraries(env: dict[str, str] | None = None) -> tuple[str, ...]:
    """Hold the libraries' loggers at WARNING, except those the environment asks to hear
    (their records are not even made). Returns the names held."""
    env = dict(os.environ) if env is None else env
    wanted = {n.strip() for n in env.get(LIBRARY_ENV, "").split(",") if n.strip()}
    quiet = tuple(n for n in LIBRARIES if "all" not in wanted and n not in wanted)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(LIBRARY_FLOOR if name in quiet else logging.NOTSET)
    return quiet


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
    if under_journal():
        from systemd.journal import JournalHandler  # only needed, and present, under systemd

        handler = JournalHandler(SYSLOG_IDENTIFIER=name)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_LibraryFloor(quiet_libraries()))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(name)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
