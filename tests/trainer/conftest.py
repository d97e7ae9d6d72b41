"""Fixtures of the trainer tests."""

from __future__ import annotations

import pytest
from trainer_testkit import make_store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> str:
    """A sealed 1024-row, d=16 store shared by the session's tests (read-only)."""
    return make_store(str(tmp_path_factory.mktemp("store") / "tiny"))
