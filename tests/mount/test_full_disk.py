"""A full disk: writes fail with ENOSPC, nothing stored is damaged, and the
mount goes on working once space returns (no remount needed)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from .conftest import Mount, is_mounted, jz, start_mount, teardown

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)")


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_enospc_then_recovery(small_disk, tmp_path) -> None:
    import blake3

    jz("init", str(small_disk / "repo"))
    m: Mount = start_mount(small_disk / "repo", tmp_path / "mnt")
    try:
        (m.main / "keep.txt").write_text("precious\n")
        jz("commit", "-m", "before", cwd=m.main)
        data = blake3.blake3(b"x").digest(length=80 << 20)
        with pytest.raises(OSError) as ei:
            with open(m.main / "big", "wb") as f:
                for i in range(80):
                    f.write(data[i << 20 : (i + 1) << 20])
                # no fsync: close() itself must report what could not be stored
        assert ei.value.errno == errno.ENOSPC, subprocess.run(
            ["df", "-h", str(small_disk)], capture_output=True, text=True).stdout
        # the mount keeps serving, and what was stored is intact
        assert (m.main / "keep.txt").read_text() == "precious\n"
        snap = m.mnt / ".commits"
        assert any((snap / c / "keep.txt").exists() for c in os.listdir(snap))
        subprocess.run(["mount", "-o", "remount,size=300m", str(small_disk)], check=True)
        (m.main / "after.txt").write_text("space is back\n")
        assert (m.main / "after.txt").read_text() == "space is back\n"
        (m.main / "big").write_bytes(data[: 20 << 20])
        assert (m.main / "big").read_bytes() == data[: 20 << 20]
        jz("commit", "-m", "after", cwd=m.main)
        res = jz("fsck", "--json", cwd=m.main)
        assert '"ok": true' in res.stdout
    finally:
        teardown(m)
    assert not is_mounted(m.mnt)
