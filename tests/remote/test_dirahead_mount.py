"""Cross-file readahead through a real mount of a fresh clone (SeaweedFS).

A reader that takes a directory's small files in listing order, on an empty
cache, finds the next files' chunks fetched before it opens them; a reader
that jumps around does not make the mount fetch files it did not read.  Both
on a branch and in a commit's snapshot.  The policy itself is unit-tested in
tests/test_dirahead.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from jiaozifuse.chunking import chunk_and_hash
from jiaozifuse.repo import Repository

FILES = 120
SIZE = 24 << 10


def data(i: int) -> bytes:
    import blake3

    return blake3.blake3(i.to_bytes(8, "little")).digest(length=SIZE)


def cached(repo: Path, files: range) -> list[bool]:
    """Whether each file's chunks are all in the clone's chunk cache."""
    c = Repository.open(repo, readonly=True)
    try:
        with c.store.read() as r:
            return [all(r.has_chunk(cid) for cid, _ in chunk_and_hash(data(i))) for i in files]
    finally:
        c.close()


@pytest.fixture
def clone_mount(tmp_path, bucket, request):
    """A repository of FILES small files in data/ (and a subdirectory among
    them), committed and synced; a fresh clone of it, mounted.  Yields
    (mount, the directory on main, the same directory in the commit).  An
    indirect parameter gives extra mount options."""
    from mount.conftest import Mount, jz, teardown

    s3, name = bucket
    env = s3.env()
    url = f"s3://{name}/repo"
    src = tmp_path / "src" / "data"
    (src / "f050-sub").mkdir(parents=True)
    (src / "f050-sub" / "inner").write_bytes(b"not read")
    for i in range(FILES):
        (src / f"f{i:03d}").write_bytes(data(i))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        a = Repository.init(tmp_path / "a", remote=url, endpoint_url=s3.endpoint)
        a.import_dir("main", src.parent)
        commit = a.commit("main", "data")
        a.sync()
        a.close()
    repo = tmp_path / "b"
    jz("clone", url, str(repo), env=env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    jz("mount", str(repo), str(mnt), *getattr(request, "param", ()), env=env)
    m = Mount(repo, mnt, json.loads((mnt / ".jiaozifuse-mount").read_text())["pid"])
    try:
        yield m, m.main / "data", mnt / ".commits" / commit.hex() / "data"
    finally:
        teardown(m)


def wait_cached(repo: Path, files: range, timeout: float = 15) -> list[bool]:
    deadline = time.monotonic() + timeout
    while True:  # fetched in the background, recorded with the next commit
        got = cached(repo, files)
        if all(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.mark.parametrize("where", ["branch", "commit"])
def test_walking_a_directory_fetches_the_next_files_before_they_are_opened(
        clone_mount, where) -> None:
    m, on_main, in_commit = clone_mount
    d = on_main if where == "branch" else in_commit
    names = sorted(p.name for p in d.iterdir())  # a listing, as cp -r starts with
    assert names[50] == "f050" and names[51] == "f050-sub"
    assert cached(m.repo, range(FILES)) == [False] * FILES  # an empty cache
    for i in range(3):
        assert (d / f"f{i:03d}").read_bytes() == data(i)
    # the walk was seen at the second file: the files after it come without being read
    got = wait_cached(m.repo, range(3, 3 + 6))
    assert got == [True] * 6
    for i in range(3, FILES):  # walked past the subdirectory, to the end
        assert (d / f"f{i:03d}").read_bytes() == data(i)
    assert wait_cached(m.repo, range(FILES)) == [True] * FILES


def test_a_reader_that_jumps_around_is_not_followed(clone_mount) -> None:
    m, on_main, _ = clone_mount
    order = [70, 10, 90, 30, 5, 60]
    for i in order:
        assert (on_main / f"f{i:03d}").read_bytes() == data(i)
    got = cached(m.repo, range(FILES))
    # the files read are cached (after their group commit); none other was fetched
    deadline = time.monotonic() + 10
    while not all(got[i] for i in order) and time.monotonic() < deadline:
        time.sleep(0.1)
        got = cached(m.repo, range(FILES))
    assert {i for i, ok in enumerate(got) if ok} == set(order)


@pytest.mark.parametrize("clone_mount", [("--no-dir-readahead",)], indirect=True)
def test_no_dir_readahead_fetches_only_what_is_read(clone_mount) -> None:
    m, on_main, _ = clone_mount
    for i in range(10):
        assert (on_main / f"f{i:03d}").read_bytes() == data(i)
    assert wait_cached(m.repo, range(10)) == [True] * 10
    assert not any(cached(m.repo, range(10, FILES)))
