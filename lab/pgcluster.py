"""A throw-away PostgreSQL cluster for tests, benchmarks and the demo: Debian's server
binaries (package ``postgresql``), run as an unprivileged user (PostgreSQL refuses root) in a
temporary directory, listening only on its own Unix socket there (no TCP), with its own port
number (the socket's name). Everything goes away with ``stop()``: the server is stopped
(immediate mode: nothing in it is worth a checkpoint) and the directory removed.

    with PgCluster.start() as cluster:
        url = cluster.new_database("t1")     # postgresql://brski@/t1?host=...&port=...

Network namespaces do not separate Unix sockets, so registrars in a lab's namespaces reach
the cluster through the same URL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

SUPERUSER = "brski"  # the cluster's own superuser (trust authentication on its socket)
RUN_AS = "nobody"


class PgClusterError(Exception):
    """The cluster could not be made or started; the message says which step and why."""


def server_bin_dir() -> Path:
    """The newest installed major version's binaries (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise PgClusterError("no PostgreSQL server installed (Debian package postgresql: "
                             "make setup installs it)")
    return Path(found[-1]).parent


class PgCluster:
    def __init__(self, root: Path, port: int, bindir: Path) -> None:
        self.root = root
        self.port = port
        self.bindir = bindir
        self.data = root / "data"
        self.socket_dir = root / "run"
        self.log = root / "server.log"
        self._databases = 0

    @classmethod
    def start(cls, *, run_as: str = RUN_AS, durable: bool = False) -> Self:
        """``durable``: fsync as a production server does (benchmarks compare it with
        SQLite's synchronous=FULL); otherwise off, for speed (tests kill registrars, not
        the server)."""
        bindir = server_bin_dir()
        user = pwd.getpwnam(run_as)
        root = Path(tempfile.mkdtemp(prefix="brski-pg-"))
        cluster = cls(root, random.randrange(20000, 60000), bindir)
        try:
            os.chown(root, user.pw_uid, user.pw_gid)
            cluster.socket_dir.mkdir()
            os.chown(cluster.socket_dir, user.pw_uid, user.pw_gid)
            cluster._run(run_as, [str(bindir / "initdb"), "-D", str(cluster.data), "-U",
                                  SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8",
                                  "--locale=C.UTF-8"], "initdb")
            options = (f"-c listen_addresses='' -c unix_socket_directories={cluster.socket_dir}"
                       f" -c port={cluster.port} -c max_connections=100")
            if not durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            cluster._run(run_as, [str(bindir / "pg_ctl"), "-D", str(cluster.data), "-l",
                                  str(cluster.log), "-o", options, "-w", "-t", "60", "start"],
                         "pg_ctl start")
        except BaseException:
            cluster.stop()
            raise
        cluster.run_as = run_as
        return cluster

    def _run(self, run_as: str, argv: list[str], step: str) -> None:
        user = pwd.getpwnam(run_as)
        done = subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                              cwd=self.root, capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            log = self.log.read_text(errors="replace").strip().splitlines()[-3:] \
                if self.log.exists() else []
            raise PgClusterError(f"{step} failed ({done.returncode}): "
                                 f"{' | '.join(tail + log)}")

    def url(self, database: str = "postgres") -> str:
        return (f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}"
                f"&port={self.port}")

    def execute(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def new_database(self, prefix: str = "store") -> str:
        """A new empty database; its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}_{time.monotonic_ns() % 10**6}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def restart(self) -> None:
        """Stop (fast: connections are cut) and start again, as a server restart or failover
        looks to its clients."""
        self._run(getattr(self, "run_as", RUN_AS),
                  [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-m", "fast", "-w", "-t", "60", "restart"], "pg_ctl restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(PgClusterError, subprocess.TimeoutExpired):
                self._run(getattr(self, "run_as", RUN_AS),
                          [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                           "immediate", "-w", "-t", "30", "stop"], "pg_ctl stop")
            self._kill_leftover()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftover(self) -> None:
        """If pg_ctl could not stop it, the postmaster this cluster started (by its PID)."""
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, 9)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
