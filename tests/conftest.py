"""Generic fixtures shared by the test suite (keep this file small)."""

from __future__ import annotations

import pytest

from jiaozifuse.repo import Repository


@pytest.fixture
def tmp_repo(tmp_path):
    """A fresh repository at ``tmp_path/'repo'``, closed at teardown."""
    repo = Repository.init(tmp_path / "repo")
    try:
        yield repo
    finally:
        repo.close()
