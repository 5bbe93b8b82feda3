"""Shared pytest fixtures: where the public test vectors are, root checks, a throw-away
PostgreSQL cluster."""

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests stop the lab and `joinproxyctl trace` with SIGINT, as Ctrl-C would. A runner started
# as a background job of a non-interactive shell (`make test &`) inherits SIGINT ignored, and
# so would every process a test starts: Python then installs no KeyboardInterrupt handler and
# the SIGINT is lost. A handler of our own is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def vectors_root() -> Path:
    """The shared test vectors: $BRSKI_VECTORS, else ../shared/vectors beside the clone."""
    override = os.environ.get("BRSKI_VECTORS")
    return Path(override) if override else REPO.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    root = vectors_root()
    if not root.is_dir():
        pytest.skip(f"no test vectors at {root} (set BRSKI_VECTORS); CI always has them")
    return root


@pytest.fixture(scope="session")
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL cluster for the session (lab.pgcluster: unprivileged, in a temporary
    directory, its own socket and port), stopped and removed at the end, failed or not."""
    from lab.pgcluster import PgCluster
    cluster = PgCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A new empty database in the session's cluster."""
    return pg_cluster.new_database()
