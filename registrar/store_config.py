"""``[store]`` of the registrar's and the MASA's configuration: where the store is.

    [store]
    path = "registrar.db"      # SQLite file (created if missing), the default
    # url = "postgresql://brski@db.example/brski_registrar"   # or: a PostgreSQL database
                               # (libpq URL; keep the password out of it: ~/.pgpass or
                               # PGPASSFILE of the service user, see libpq's documentation)

Either ``path`` or ``url``, not both. The registrars of one domain share one ``url``.
"""

from __future__ import annotations

from pathlib import Path

from .store import PG_SCHEMES, is_url
from .tomlconfig import Table


def load_store_target(root: Table, default_file: str) -> Path | str:
    """The store's path, or its ``postgresql://`` URL (a ``str``)."""
    table = root.table("store")
    if table.has("url"):
        if table.has("path"):
            raise table.error("url", "give path (SQLite) or url (PostgreSQL), not both")
        url = table.string("url")
        if not is_url(url):
            raise table.error("url", f"must start with {' or '.join(PG_SCHEMES)}")
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:
            raise table.error("url", "PostgreSQL needs the psycopg package, which is not "
                                     "installed") from exc
        try:
            conninfo_to_dict(url)
        except Exception as exc:  # psycopg.ProgrammingError: the URL does not parse
            raise table.error("url", "not a valid PostgreSQL connection URL") from exc
        table.finish()
        return url
    target = table.new_file("path", default_file)
    table.finish()
    return target
