"""Large directories through the mount: a listing spans many FUSE readdir replies.

The kernel takes about 800 entries per READDIRPLUS reply and asks again from the
offset of the last one; these check that every entry comes exactly once across
those replies, on a branch (listed in batches from LMDB) and in a commit's
snapshot (a cached tree), also while the directory changes under the listing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .conftest import Mount

N = 3000


def big_dir(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    src = tmp_path / "src" / "samples"
    src.mkdir(parents=True)
    sizes = {}
    for i in range(N):
        name = f"s{i:05d}.bin"
        data = os.urandom(i % 97)
        (src / name).write_bytes(data)
        sizes[name] = len(data)
    return src.parent, sizes


def test_listing_a_large_directory_gives_every_entry_once(mount_factory, tmp_path) -> None:
    src, sizes = big_dir(tmp_path)
    m: Mount = mount_factory()
    m.cli("import", str(src))
    commit = json.loads(m.cli("commit", "-m", "samples", "--json").stdout)["id"]
    for d in (m.main / "samples", m.mnt / ".commits" / commit / "samples"):
        with os.scandir(d) as it:
            got = {e.name: e.stat(follow_symlinks=False).st_size for e in it}
        assert got == sizes, d
        names = os.listdir(d)
        assert len(names) == len(set(names)) == N
    snap = m.mnt / ".commits" / commit / "samples"
    for name in list(sizes)[::7]:  # lookups in the snapshot, each against its tree
        assert (snap / name).stat().st_size == sizes[name]
        assert len((snap / name).read_bytes()) == sizes[name]


def test_a_directory_changed_while_listed(mount_factory, tmp_path) -> None:
    """Entries removed ahead of the listing are not listed, entries untouched are
    listed once, none twice (POSIX leaves entries added meanwhile unspecified)."""
    src, sizes = big_dir(tmp_path)
    m: Mount = mount_factory()
    m.cli("import", str(src))
    d = m.main / "samples"
    names = sorted(sizes)
    removed = set(names[1500::10])
    seen: list[str] = []
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            for i, entry in enumerate(it):
                seen.append(entry.name)
                if i == 100:  # the first reply is in; change the rest
                    for name in removed:
                        os.unlink(d / name)
                    for j in range(50):
                        (d / f"new{j:03d}").write_bytes(b"x")
    finally:
        os.close(fd)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    untouched = set(names) - removed
    assert untouched <= set(seen)
    assert not (removed - set(names[:101])) & set(seen)
    assert set(os.listdir(d)) == untouched | {f"new{j:03d}" for j in range(50)}
