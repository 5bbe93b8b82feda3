"""Shared pytest fixtures: where the public test vectors are, and root checks."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
