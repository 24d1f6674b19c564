"""The mount's snapshot directories (fs.Ops), driven without FUSE: a lookup or a
listing in a commit's directory decodes its tree once while it is in use."""

from __future__ import annotations

import pytest
import trio

from jiaozifuse import fs
from jiaozifuse.fs import COMMITS, Ops
from jiaozifuse.repo import Repository


@pytest.fixture
def snapshot(tmp_path):
    """A repository whose one commit has three directories of 300 files each."""
    src = tmp_path / "src"
    for d in ("a", "b", "c"):
        (src / d).mkdir(parents=True)
        for i in range(300):
            (src / d / f"f{i:03d}").write_bytes(f"{d}{i}".encode())
    repo = Repository.init(tmp_path / "repo")
    repo.import_dir("main", src)
    commit = repo.commit("main", "data")
    yield repo, commit
    repo.close()


def counting_trees(monkeypatch, repo):
    decoded = []
    real = repo.get_tree
    monkeypatch.setattr(repo, "get_tree", lambda tid, t=None: decoded.append(tid) or real(tid, t))
    return decoded


def test_lookups_in_a_snapshot_directory_decode_its_tree_once(snapshot, monkeypatch) -> None:
    repo, commit = snapshot
    ops = Ops(repo, read_only=True)
    decoded = counting_trees(monkeypatch, repo)

    async def main() -> None:
        root = await ops.lookup(COMMITS, commit.hex().encode())
        a = await ops.lookup(root.st_ino, b"a")
        for i in range(300):
            attr = await ops.lookup(a.st_ino, f"f{i:03d}".encode())
            assert attr.st_size == len(f"a{i}")
        assert (await ops.lookup(a.st_ino, b"missing")).st_ino == 0

    trio.run(main)
    assert len(decoded) <= 3  # the commit's root, a (and a's own subdirectory count)


def test_the_tree_cache_is_bounded_and_stays_correct(snapshot, monkeypatch) -> None:
    repo, commit = snapshot
    monkeypatch.setattr(fs, "TREE_CACHE_ENTRIES", 400)  # room for one directory
    ops = Ops(repo, read_only=True)

    async def main() -> None:
        root = await ops.lookup(COMMITS, commit.hex().encode())
        dirs = {d: (await ops.lookup(root.st_ino, d.encode())).st_ino for d in "abc"}
        for _ in range(2):
            for d, ino in dirs.items():
                for i in (0, 150, 299):
                    attr = await ops.lookup(ino, f"f{i:03d}".encode())
                    assert attr.st_size == len(f"{d}{i}")
                assert ops._tree_entries <= 400 + 300

    trio.run(main)
