"""SIGKILL of the daemon at random moments loses no acknowledged write."""

from __future__ import annotations

import pytest

from .conftest import jz
from .crash_harness import soak


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_during_random_writes(mount_factory, seed: int) -> None:
    m = mount_factory(f"crash{seed}")
    results = soak(jz, m.repo, m.mnt, rounds=3, seed=seed)
    for res in results:
        assert res["fsck_ok"], res["fsck"]
        assert not res["wrong"], res["wrong"]
    assert sum(r["acks"] for r in results) > 0, "the workload never got going"
