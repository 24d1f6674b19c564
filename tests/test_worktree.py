"""Branch worktrees (jiaozifuse/worktree.py): inode operations and a path-level model test."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from jiaozifuse.errors import Exists, JiaoziError, NotFound
from jiaozifuse.repo import Repository
from jiaozifuse.worktree import Worktree

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
LINK = stat.S_IFLNK | 0o777


def pseudo(seed: int, n: int) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def put_file(wt: Worktree, root: int, path: str, data: bytes, offset: int | None = 0,
             truncate: bool = True) -> int:
    """Create or open *path*, write *data* at *offset* (None: append), close."""
    parent, name = wt.resolve_parent(root, path)
    try:
        node = wt.lookup(parent.ino, name)
    except NotFound:
        node = wt.create(parent.ino, name, FILE)
    of = wt.open(node.ino)
    try:
        if truncate and offset == 0:
            wt.truncate(node.ino, 0)
        off = of.size if offset is None else offset
        if data:
            # in 1 MiB pieces, as the kernel sends them
            for i in range(0, len(data), 1 << 20):
                wt.write(node.ino, off + i, data[i : i + (1 << 20)])
    finally:
        wt.release(node.ino)
    return node.ino


def read_file(wt: Worktree, root: int, path: str) -> bytes:
    node = wt.resolve(root, path)
    return wt.read(node.ino, 0, node.size + 100)


def tree_of(wt: Worktree, root: int) -> tuple[dict[str, bytes], set[str], dict[str, int]]:
    """(files, dirs, nlink per path) of a worktree, through readdir and read."""
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    nlinks: dict[str, int] = {}

    def walk(ino: int, prefix: str) -> None:
        names = []
        for name, node, _seq in wt.readdir(ino):
            names.append(name)
            path = prefix + os.fsdecode(name)
            looked = wt.lookup(ino, name)
            assert looked.ino == node.ino, f"readdir and lookup disagree on {path}"
            if node.is_dir:
                dirs.add(path)
                before = wt.getattr(node.ino).nlink
                walk(node.ino, path + "/")
                # A directory not loaded from its tree yet says 1 ("not counted",
                # as btrfs does); once listed, 2 + its subdirectories.
                nlinks[path] = wt.getattr(node.ino).nlink
                assert before in (1, nlinks[path]), f"{path}: nlink {before}, then {nlinks[path]}"
            elif node.is_file:
                attr = wt.getattr(node.ino)
                data = wt.read(node.ino, 0, attr.size + 100)
                assert len(data) == attr.size, f"{path}: size {attr.size}, read {len(data)}"
                files[path] = data
                nlinks[path] = attr.nlink
            else:
                files[path] = b"->" + node.target
        assert len(names) == len(set(names)), f"duplicate names in {prefix or '/'}"

    walk(root, "")
    return files, dirs, nlinks


def tree_of_dir(dest: Path) -> tuple[dict[str, bytes], set[str]]:
    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(dest):
        rel = os.path.relpath(dirpath, dest)
        pre = "" if rel == "." else rel + "/"
        for d in dirnames:
            dirs.add(pre + d)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                files[pre + f] = b"->" + os.fsencode(os.readlink(p))
            else:
                files[pre + f] = Path(p).read_bytes()
    return files, dirs


@pytest.fixture
def wt_root(tmp_repo):
    return tmp_repo.worktree, tmp_repo.root_ino("main")


# ------------------------------------------------------------- inode operations


def test_create_lookup_readdir(wt_root):
    wt, root = wt_root
    f = wt.create(root, b"f", FILE, 1000, 1000)
    d = wt.create(root, b"d", DIR)
    s = wt.create(root, b"s", LINK, target=b"f")
    assert wt.lookup(root, b"f").ino == f.ino
    assert (f.uid, f.gid) == (1000, 1000)
    assert wt.lookup(root, b"s").target == b"f"
    assert wt.lookup(root, b"d").is_dir
    assert [n for n, _, _ in wt.readdir(root)] == [b"f", b"d", b"s"]  # creation order
    assert len({f.ino, d.ino, s.ino, root}) == 4
    with pytest.raises(Exists) as ei:
        wt.create(root, b"f", FILE)
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(NotFound) as ei:
        wt.lookup(root, b"nope")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(JiaoziError) as ei:
        wt.lookup(f.ino, b"x")
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(JiaoziError) as ei:
        wt.create(f.ino, b"x", FILE)
    assert ei.value.errno == errno.ENOTDIR


@pytest.mark.parametrize("name,code", [
    (b"", errno.EINVAL), (b".", errno.EINVAL), (b"..", errno.EINVAL), (b"a/b", errno.EINVAL),
    (b"a\0b", errno.EINVAL), (b"x" * 256, errno.ENAMETOOLONG),
])
def test_bad_names(wt_root, name, code):
    wt, root = wt_root
    with pytest.raises(JiaoziError) as ei:
        wt.create(root, name, FILE)
    assert ei.value.errno == code
    wt.create(root, b"x" * 255, FILE)  # the longest allowed


def test_unsupported_file_types(wt_root):
    wt, root = wt_root
    for mode in (0o644, 0o170000 | 0o644):  # no type bits, or all of them
        with pytest.raises(JiaoziError) as ei:
            wt.create(root, b"odd", mode)
        assert ei.value.errno == errno.EPERM
    assert list(wt.readdir(root)) == []


def test_special_files_survive_commit_and_reload(tmp_repo):
    wt, root = tmp_repo.worktree, tmp_repo.root_ino("main")
    dev = os.makedev(1, 3)
    wt.create(root, b"fifo", stat.S_IFIFO | 0o640)
    wt.create(root, b"sock", stat.S_IFSOCK | 0o600)
    wt.create(root, b"null", stat.S_IFCHR | 0o666, target=dev.to_bytes(8, "big"))
    wt.create(root, b"link", LINK, target=b"fifo")
    cid = tmp_repo.commit("main", "specials")
    kinds = {p: stat.S_IFMT(e.mode) for p, e in tmp_repo.walk(tmp_repo.get_commit(cid).tree)}
    assert kinds == {b"fifo": stat.S_IFIFO, b"sock": stat.S_IFSOCK, b"null": stat.S_IFCHR,
                     b"link": stat.S_IFLNK}
    tmp_repo.create_branch("copy")
    croot = tmp_repo.root_ino("copy")
    assert wt.resolve(croot, "null").rdev == dev
    assert stat.S_ISFIFO(wt.resolve(croot, "fifo").mode)
    assert stat.S_IMODE(wt.resolve(croot, "fifo").mode) == 0o640
    assert wt.resolve(croot, "link").target == b"fifo"
    with pytest.raises(JiaoziError):
        wt.open(wt.resolve(croot, "fifo").ino)


def test_device_created_with_rdev_keeps_it(tmp_repo):
    wt, root = tmp_repo.worktree, tmp_repo.root_ino("main")
    node = wt.create(root, b"null", stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    assert node.rdev == os.makedev(1, 3)
    cid = tmp_repo.commit("main", "device")
    [(_, entry)] = list(tmp_repo.walk(tmp_repo.get_commit(cid).tree))
    assert entry.ref == os.makedev(1, 3).to_bytes(8, "big")


def test_readdir_offsets_are_stable(wt_root):
    wt, root = wt_root
    for i in range(10):
        wt.create(root, b"f%d" % i, FILE)
    rows = list(wt.readdir(root))
    assert [n for n, _, _ in rows] == [b"f%d" % i for i in range(10)]
    seqs = [s for _, _, s in rows]
    assert seqs == sorted(seqs)
    # resume after the 4th entry, even after entries before it were removed
    wt.unlink(root, b"f0")
    wt.unlink(root, b"f2")
    rest = [n for n, _, _ in wt.readdir(root, after_seq=seqs[3])]
    assert rest == [b"f%d" % i for i in range(4, 10)]
    wt.create(root, b"new", FILE)
    assert [n for n, _, _ in wt.readdir(root, after_seq=seqs[-1])] == [b"new"]


@pytest.mark.parametrize("batch", [1, 3, 7, 256])
def test_readdir_in_batches_lists_every_entry_once(wt_root, batch):
    """Listing in batches of lookups gives the same rows as one pass, with
    deleted entries (holes in the sequence) falling inside and across batches;
    an entry made mid-listing is listed once or not at all (as POSIX allows),
    and always when the listing had not looked that far yet."""
    wt, root = wt_root
    for i in range(40):
        wt.create(root, b"f%02d" % i, FILE)
    for i in (0, 5, 6, 7, 20, 39):
        wt.unlink(root, b"f%02d" % i)
    want = [b"f%02d" % i for i in range(40) if i not in (0, 5, 6, 7, 20, 39)]
    assert [n for n, _, _ in wt.readdir(root, batch=batch)] == want
    listing = wt.readdir(root, batch=batch)
    got = [next(listing)[0] for _ in range(10)]
    wt.create(root, b"late", FILE)
    got += [n for n, _, _ in listing]
    late = [] if batch > 10 else [b"late"]  # a batch already read is not read again
    assert got == want + late


def test_a_short_readdir_looks_up_a_batch_not_the_directory(wt_root, monkeypatch):
    """A FUSE readdir takes what fits in its buffer and asks again from there:
    the entries it did not take must not be looked up each time (quadratic)."""
    from jiaozifuse import worktree as wtmod

    wt, root = wt_root
    for i in range(3000):
        wt.create(root, b"e%05d" % i, FILE)
    looked = []
    real = wtmod.Worktree._child
    monkeypatch.setattr(wtmod.Worktree, "_child",
                        lambda self, r, ino, name: looked.append(name) or real(self, r, ino, name))
    seq = 0
    for _ in range(5):  # five replies of 100 entries each, as the kernel asks
        listing = wt.readdir(root, after_seq=seq)
        rows = [next(listing) for _ in range(100)]
        listing.close()
        seq = rows[-1][2]
    assert rows[-1][0] == b"e00499"
    assert len(looked) <= 5 * wtmod.READDIR_BATCH


def test_write_read_truncate(wt_root):
    wt, root = wt_root
    node = wt.create(root, b"f", FILE)
    of = wt.open(node.ino)
    assert wt.write(node.ino, 0, b"hello ") == 6
    wt.write(node.ino, 6, b"world")
    assert wt.read(node.ino, 0, 100) == b"hello world"
    assert wt.getattr(node.ino).size == 11
    wt.write(node.ino, 0, b"J")
    assert wt.read(node.ino, 0, 5) == b"Jello"
    wt.truncate(node.ino, 5)
    wt.write(node.ino, 7, b"!")  # small hole: zeros
    assert wt.read(node.ino, 0, 100) == b"Jello\0\0!"
    assert of.size == 8
    wt.release(node.ino)
    assert node.ino not in wt.open_files
    assert wt.getattr(node.ino).size == 8
    assert read_file(wt, root, "f") == b"Jello\0\0!"
    wt.setattr(node.ino, size=2)
    assert read_file(wt, root, "f") == b"Je"


def test_two_handles_share_one_open_file(wt_root):
    wt, root = wt_root
    node = wt.create(root, b"f", FILE)
    a = wt.open(node.ino)
    b = wt.open(node.ino)
    assert a is b and a.opens == 2
    wt.write(node.ino, 0, b"abc")
    assert wt.read(node.ino, 0, 10) == b"abc"
    wt.release(node.ino)
    assert wt.read(node.ino, 0, 10) == b"abc"
    wt.release(node.ino)
    assert read_file(wt, root, "f") == b"abc"


def test_unlinked_open_file_stays_readable(wt_root):
    wt, root = wt_root
    node = put_file(wt, root, "f", b"data")
    wt.open(node)
    wt.unlink(root, b"f")
    with pytest.raises(NotFound):
        wt.lookup(root, b"f")
    assert wt.read(node, 0, 10) == b"data"
    wt.write(node, 4, b"more")
    assert wt.read(node, 0, 10) == b"datamore"
    with wt.store.read() as r:
        assert r.get("orphans", node.to_bytes(8, "big")) is not None
    wt.release(node)
    with wt.store.read() as r:
        assert r.get("orphans", node.to_bytes(8, "big")) is None
        assert r.get("inodes", node.to_bytes(8, "big")) is None
    assert tree_of(wt, root)[0] == {}


def test_hard_links(wt_root):
    wt, root = wt_root
    ino = put_file(wt, root, "a", b"one")
    d = wt.create(root, b"d", DIR)
    wt.link(ino, d.ino, b"b")
    assert wt.getattr(ino).nlink == 2
    put_file(wt, root, "d/b", b"two", offset=3, truncate=False)
    assert read_file(wt, root, "a") == b"onetwo"
    wt.unlink(root, b"a")
    assert wt.getattr(ino).nlink == 1
    assert read_file(wt, root, "d/b") == b"onetwo"
    with pytest.raises(JiaoziError) as ei:
        wt.link(d.ino, root, b"dirlink")
    assert ei.value.errno == errno.EPERM
    with pytest.raises(Exists):
        wt.link(ino, d.ino, b"b")


def test_unlink_and_rmdir_errors(wt_root):
    wt, root = wt_root
    d = wt.create(root, b"d", DIR)
    wt.create(d.ino, b"f", FILE)
    with pytest.raises(JiaoziError) as ei:
        wt.unlink(root, b"d", rmdir=True)
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(JiaoziError) as ei:
        wt.unlink(root, b"d")
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(JiaoziError) as ei:
        wt.unlink(d.ino, b"f", rmdir=True)
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(NotFound):
        wt.unlink(root, b"missing")
    wt.unlink(d.ino, b"f")
    wt.unlink(root, b"d", rmdir=True)
    assert list(wt.readdir(root)) == []
    assert wt.getattr(root).nlink == 2


def test_rename_rules(wt_root):
    wt, root = wt_root
    a = wt.makedirs(root, "a/b/c")
    wt.create(root, b"f", FILE)
    wt.create(root, b"g", FILE)
    e = wt.create(root, b"empty", DIR)
    top = wt.resolve(root, "a")
    with pytest.raises(JiaoziError) as ei:
        wt.rename(root, b"a", a.ino, b"inside")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(JiaoziError) as ei:
        wt.rename(root, b"f", root, b"a")  # file over a directory
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(JiaoziError) as ei:
        wt.rename(root, b"a", root, b"f")  # directory over a file
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(JiaoziError) as ei:
        wt.rename(root, b"empty", root, b"a")  # over a non-empty directory
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(Exists):
        wt.rename(root, b"f", root, b"g", noreplace=True)
    with pytest.raises(NotFound):
        wt.rename(root, b"missing", root, b"x")
    moved, replaced = wt.rename(root, b"f", root, b"g")
    assert replaced is not None and moved.ino != replaced.ino
    moved, replaced = wt.rename(root, b"a", root, b"empty")  # over an empty directory
    assert replaced is not None and replaced.ino == e.ino
    assert wt.resolve(root, "empty/b/c").ino == a.ino
    assert wt.resolve(root, "empty").ino == top.ino
    assert sorted(n for n, _, _ in wt.readdir(root)) == [b"empty", b"g"]
    assert wt.getattr(root).nlink == 3


def test_relatime_moves_atime_once_after_a_change_and_changes_nothing_else(tmp_repo):
    wt, root = tmp_repo.worktree, tmp_repo.root_ino("main")
    ino = put_file(wt, root, "f", b"data")
    tmp_repo.commit("main", "c")
    wt.setattr(ino, atime_ns=1_000_000_000, mtime_ns=2_000_000_000)
    status = tmp_repo.status("main")
    before = wt.getattr(ino)
    of = wt.open(ino)
    try:
        assert wt.relatime(of)  # atime not after mtime: a read moves it
        assert not wt.relatime(of)  # now after mtime and ctime: it stays
    finally:
        wt.release(ino)
    after = wt.getattr(ino)
    assert after.atime_ns > before.ctime_ns
    assert (after.mtime_ns, after.ctime_ns) == (before.mtime_ns, before.ctime_ns)
    assert tmp_repo.status("main") == status  # nothing more to commit


def test_relatime_that_cannot_be_recorded_does_not_stop_the_read(tmp_repo, monkeypatch):
    """A full disk refuses the atime's inode write: the open (and read) go on."""
    from contextlib import contextmanager

    from jiaozifuse.errors import StoreFull

    wt, root = tmp_repo.worktree, tmp_repo.root_ino("main")
    ino = put_file(wt, root, "f", b"data")
    wt.setattr(ino, atime_ns=1_000_000_000)
    before = wt.getattr(ino).atime_ns

    @contextmanager
    def full():
        raise StoreFull("no space left (injected)")
        yield

    of = wt.open(ino)
    try:
        monkeypatch.setattr(tmp_repo.store, "write", full)
        assert not wt.relatime(of)
        monkeypatch.undo()
        assert wt.read(ino, 0, 10) == b"data"
    finally:
        wt.release(ino)
    assert wt.getattr(ino).atime_ns == before


def test_setattr_and_xattrs(wt_root):
    wt, root = wt_root
    ino = put_file(wt, root, "f", b"x")
    node = wt.setattr(ino, mode=0o600, uid=7, gid=8, mtime_ns=123_456_789_012)
    assert stat.S_ISREG(node.mode) and stat.S_IMODE(node.mode) == 0o600
    assert (node.uid, node.gid, node.mtime_ns) == (7, 8, 123_456_789_012)
    wt.setxattr(ino, b"user.k", b"v")
    assert wt.getattr(ino).xattrs == {b"user.k": b"v"}
    wt.setxattr(ino, b"user.k", None)
    assert wt.getattr(ino).xattrs == {}
    with pytest.raises(JiaoziError) as ei:
        wt.setxattr(ino, b"user.k", None)
    assert ei.value.errno == errno.ENODATA


def test_paths(wt_root):
    wt, root = wt_root
    d = wt.makedirs(root, "x/y/z")
    assert wt.makedirs(root, "x/y/z").ino == d.ino
    assert wt.resolve(root, "/x//y/./z/").ino == d.ino
    assert wt.resolve(root, "").ino == root
    parent, name = wt.resolve_parent(root, "x/y/new")
    assert name == b"new" and parent.ino == wt.resolve(root, "x/y").ino
    with pytest.raises(JiaoziError):
        wt.resolve(root, "x/../x")
    with pytest.raises(JiaoziError):
        wt.resolve_parent(root, "/")
    put_file(wt, root, "x/file", b"")
    with pytest.raises(JiaoziError) as ei:
        wt.makedirs(root, "x/file/sub")
    assert ei.value.errno == errno.ENOTDIR


def test_write_tree_rewrites_only_dirty_directories(tmp_repo):
    wt, root = tmp_repo.worktree, tmp_repo.root_ino("main")
    for d in range(5):
        wt.makedirs(root, f"d{d}")
        for f in range(3):
            put_file(wt, root, f"d{d}/f{f}", b"%d-%d" % (d, f))
    tmp_repo.commit("main", "base")
    put_file(wt, root, "d3/f1", b"changed")
    with tmp_repo.store.write() as w:
        before = w.txn.stat(w._dbs["objects"])["entries"]
        wt.write_tree(w, root)
        after = w.txn.stat(w._dbs["objects"])["entries"]
    assert after - before == 2  # d3's tree and the root tree; the manifest was stored at close
    assert [c.path for c in tmp_repo.status("main")] == ["d3/f1"]


def test_directory_nlink_after_loading_from_a_tree(tmp_repo):
    wt, root = tmp_repo.worktree, tmp_repo.root_ino("main")
    wt.makedirs(root, "d/x")
    wt.makedirs(root, "d/y")
    assert wt.resolve(root, "d").nlink == 4
    tmp_repo.commit("main", "c")
    tmp_repo.create_branch("dev")
    dev = tmp_repo.root_ino("dev")
    # Not loaded yet: 1 means "unknown" (as on btrfs); find and ls cope with it.
    assert wt.resolve(dev, "d").nlink in (1, 4)
    list(wt.readdir(wt.resolve(dev, "d").ino))
    assert wt.resolve(dev, "d").nlink == 4
    assert wt.getattr(dev).nlink == 3


def test_create_after_removing_subdirs_of_a_committed_directory(tmp_repo):
    wt, root = tmp_repo.worktree, tmp_repo.root_ino("main")
    wt.makedirs(root, "d/x")
    wt.makedirs(root, "d/y")
    tmp_repo.commit("main", "c")
    tmp_repo.reset("main", hard=True)  # or any new branch: d is loaded from its tree
    d = wt.resolve(root, "d")
    wt.unlink(d.ino, b"x", rmdir=True)
    wt.unlink(d.ino, b"y", rmdir=True)
    wt.create(d.ino, b"new", FILE)
    assert [n for n, _, _ in wt.readdir(d.ino)] == [b"new"]


def test_branches_are_isolated(tmp_repo):
    wt = tmp_repo.worktree
    put_file(wt, tmp_repo.root_ino("main"), "shared", b"v1")
    tmp_repo.commit("main", "v1")
    tmp_repo.create_branch("dev")
    dev = tmp_repo.root_ino("dev")
    assert read_file(wt, dev, "shared") == b"v1"
    put_file(wt, dev, "shared", b"dev!")
    put_file(wt, dev, "only-dev", b"x")
    assert read_file(wt, tmp_repo.root_ino("main"), "shared") == b"v1"
    assert tree_of(wt, tmp_repo.root_ino("main"))[0] == {"shared": b"v1"}
    assert tree_of(wt, dev)[0] == {"shared": b"dev!", "only-dev": b"x"}


# ------------------------------------------------------- path-level model test

NAMES = ["a", "b", "c", "d"]


class WorktreeModel(RuleBasedStateMachine):
    """Path-level operations on a branch worktree against a dict model.

    Model: ``paths`` maps a file path to a file key, ``data`` a key to bytes
    (hard links share a key), ``dirs`` is the set of directory paths.
    """

    @initialize()
    def setup(self):
        self.tmp = tempfile.mkdtemp(prefix="jz-wt-model-")
        self.repo = Repository.init(Path(self.tmp) / "repo")
        self.wt = self.repo.worktree
        self.root = self.repo.root_ino("main")
        self.paths: dict[str, int] = {}
        self.data: dict[int, bytearray] = {}
        self.dirs: set[str] = set()
        self.next_key = 0
        self.commits: list[tuple[str, dict[str, bytes], set[str]]] = []
        self.held: list[int] = []  # inodes kept open across steps
        self.branch = "main"
        self.snapshot: tuple[dict[str, bytes], set[str]] = ({}, set())  # the head's content

    def teardown(self):
        if hasattr(self, "repo"):
            try:
                # every commit is immutable: the oldest and the newest export unchanged
                for cid, files, dirs in self.commits[:1] + self.commits[-1:]:
                    self._check_export(cid, files, dirs)
            finally:
                self.repo.close()
                shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    def _files(self) -> dict[str, bytes]:
        return {p: bytes(self.data[k]) for p, k in self.paths.items()}

    def _exists(self, path: str) -> bool:
        return path in self.paths or path in self.dirs

    def _parent_ok(self, path: str) -> bool:
        parent = path.rpartition("/")[0]
        return parent == "" or parent in self.dirs

    def _children(self, d: str) -> list[str]:
        pre = d + "/"
        return [p for p in list(self.paths) + list(self.dirs) if p.startswith(pre)]

    def _new_path(self, data) -> str:
        parents = ["", *sorted(self.dirs)]
        parent = data.draw(st.sampled_from(parents), label="parent")
        name = data.draw(st.sampled_from(NAMES), label="name")
        return f"{parent}/{name}" if parent else name

    def _content(self, data) -> bytes:
        size = data.draw(st.sampled_from([0, 1, 10, 1000, 70_000, 300_000]), label="size")
        seed = data.draw(st.integers(0, 1000), label="seed")
        return pseudo(seed, size)

    def _check_export(self, cid: str, files: dict[str, bytes], dirs: set[str]) -> None:
        dest = Path(self.tmp) / f"export-{cid[:12]}-{len(os.listdir(self.tmp))}"
        self.repo.export(cid, dest)
        got_files, got_dirs = tree_of_dir(dest)
        assert got_dirs == dirs
        assert got_files == files
        shutil.rmtree(dest)

    # ------------------------------------------------------------------ rules

    @rule(data=st.data())
    def create_file(self, data):
        path = self._new_path(data)
        content = self._content(data)
        if self._exists(path):
            parent, name = self.wt.resolve_parent(self.root, path)
            with pytest.raises(Exists):
                self.wt.create(parent.ino, name, FILE)
            return
        put_file(self.wt, self.root, path, content)
        self.paths[path] = self.next_key
        self.data[self.next_key] = bytearray(content)
        self.next_key += 1

    @precondition(lambda self: self.paths)
    @rule(data=st.data())
    def overwrite(self, data):
        path = data.draw(st.sampled_from(sorted(self.paths)))
        content = self._content(data)
        put_file(self.wt, self.root, path, content)
        self.data[self.paths[path]][:] = content

    @precondition(lambda self: self.paths)
    @rule(data=st.data())
    def write_at(self, data):
        """Write inside, at the end of, or past the end of a file (append or a small gap)."""
        path = data.draw(st.sampled_from(sorted(self.paths)))
        buf = self.data[self.paths[path]]
        where = data.draw(st.sampled_from(["inside", "append", "past"]))
        content = self._content(data)
        if where == "inside":
            off = data.draw(st.integers(0, len(buf)))
        elif where == "append":
            off = len(buf)
        else:
            off = len(buf) + data.draw(st.sampled_from([1, 5000, 200_000]))
        put_file(self.wt, self.root, path, content, offset=off, truncate=False)
        if content and off > len(buf):  # an empty write does not extend the file
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(content)] = content

    @precondition(lambda self: self.paths)
    @rule(data=st.data())
    def truncate(self, data):
        path = data.draw(st.sampled_from(sorted(self.paths)))
        buf = self.data[self.paths[path]]
        size = data.draw(st.sampled_from([0, len(buf) // 2, len(buf) + 1000]))
        node = self.wt.resolve(self.root, path)
        self.wt.setattr(node.ino, size=size)
        if size <= len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    @rule(data=st.data())
    def mkdir(self, data):
        path = self._new_path(data)
        parent, name = self.wt.resolve_parent(self.root, path)
        if self._exists(path):
            with pytest.raises(Exists):
                self.wt.create(parent.ino, name, DIR)
            return
        self.wt.create(parent.ino, name, DIR)
        self.dirs.add(path)

    @precondition(lambda self: self.paths)
    @rule(data=st.data())
    def unlink(self, data):
        path = data.draw(st.sampled_from(sorted(self.paths)))
        parent, name = self.wt.resolve_parent(self.root, path)
        self.wt.unlink(parent.ino, name)
        key = self.paths.pop(path)
        if key not in self.paths.values():
            del self.data[key]

    @precondition(lambda self: self.dirs)
    @rule(data=st.data())
    def rmdir(self, data):
        path = data.draw(st.sampled_from(sorted(self.dirs)))
        parent, name = self.wt.resolve_parent(self.root, path)
        if self._children(path):
            with pytest.raises(JiaoziError) as ei:
                self.wt.unlink(parent.ino, name, rmdir=True)
            assert ei.value.errno == errno.ENOTEMPTY
            return
        self.wt.unlink(parent.ino, name, rmdir=True)
        self.dirs.remove(path)

    @precondition(lambda self: self.paths or self.dirs)
    @rule(data=st.data())
    def rename(self, data):
        src = data.draw(st.sampled_from(sorted(self.paths) + sorted(self.dirs)), label="src")
        dst = self._new_path(data)
        p1, n1 = self.wt.resolve_parent(self.root, src)
        p2, n2 = self.wt.resolve_parent(self.root, dst)
        src_is_dir = src in self.dirs
        expect = None
        if src_is_dir and (dst == src or dst.startswith(src + "/")):
            expect = None if dst == src else errno.EINVAL
        elif dst in self.dirs:
            if not src_is_dir:
                expect = errno.EISDIR
            elif self._children(dst):
                expect = errno.ENOTEMPTY
        elif dst in self.paths and src_is_dir:
            expect = errno.ENOTDIR
        if expect is not None:
            with pytest.raises(JiaoziError) as ei:
                self.wt.rename(p1.ino, n1, p2.ino, n2)
            assert ei.value.errno == expect, (src, dst)
            return
        self.wt.rename(p1.ino, n1, p2.ino, n2)
        if src == dst:
            return
        if not src_is_dir:
            if dst in self.paths and self.paths[dst] == self.paths[src]:
                return  # two links of one inode: rename does nothing (POSIX)
            old = self.paths.pop(dst, None)
            self.paths[dst] = self.paths.pop(src)
            if old is not None and old not in self.paths.values():
                del self.data[old]
            return
        self.dirs.discard(dst)  # an empty directory that was replaced
        moved = [p for p in self._children(src)]
        self.dirs.remove(src)
        self.dirs.add(dst)
        for p in moved:
            newp = dst + p[len(src):]
            if p in self.dirs:
                self.dirs.remove(p)
                self.dirs.add(newp)
            else:
                self.paths[newp] = self.paths.pop(p)

    @precondition(lambda self: self.paths)
    @rule(data=st.data())
    def hard_link(self, data):
        src = data.draw(st.sampled_from(sorted(self.paths)), label="src")
        dst = self._new_path(data)
        node = self.wt.resolve(self.root, src)
        parent, name = self.wt.resolve_parent(self.root, dst)
        if self._exists(dst):
            with pytest.raises(Exists):
                self.wt.link(node.ino, parent.ino, name)
            return
        self.wt.link(node.ino, parent.ino, name)
        self.paths[dst] = self.paths[src]

    @precondition(lambda self: self.paths and len(self.held) < 3)
    @rule(data=st.data())
    def hold_open(self, data):
        """Keep a file open across later steps (writes and commits go through it)."""
        path = data.draw(st.sampled_from(sorted(self.paths)))
        node = self.wt.resolve(self.root, path)
        self.wt.open(node.ino)
        self.held.append(node.ino)

    @precondition(lambda self: self.held)
    @rule()
    def release_held(self):
        self.wt.release(self.held.pop())

    @rule()
    def commit(self):
        cid = self.repo.commit(self.branch, f"step {len(self.commits)}", allow_empty=True).hex()
        files, dirs = self._files(), set(self.dirs)
        self._check_export(cid, files, dirs)
        assert self.repo.status(self.branch) == []
        self.commits.append((cid, files, dirs))
        self.snapshot = (files, dirs)

    # -------------------------------------------------------------- invariant

    @invariant()
    def matches_model(self):
        if not hasattr(self, "repo"):
            return
        files, dirs, nlinks = tree_of(self.wt, self.root)
        assert dirs == self.dirs
        assert files == self._files()
        for path, key in self.paths.items():
            assert nlinks[path] == list(self.paths.values()).count(key), path
        for d in self.dirs:
            subdirs = [x for x in self.dirs if x.rpartition("/")[0] == d]
            assert nlinks[d] == 2 + len(subdirs), d
        top = [x for x in self.dirs if "/" not in x]
        assert self.wt.getattr(self.root).nlink == 2 + len(top)
        if self.check_leaks:
            self._no_leaks()

    check_leaks = True

    def _no_leaks(self) -> None:
        """Every stored inode is reachable from the root or an open orphan; every
        listing record belongs to a live name."""
        reachable = {self.root}
        names = 0
        todo = [self.root]
        while todo:
            ino = todo.pop()
            for _name, node, _seq in self.wt.readdir(ino):
                names += 1
                reachable.add(node.ino)
                if node.is_dir:
                    todo.append(node.ino)
        with self.repo.store.read() as r:
            stored = {int.from_bytes(k, "big") for k, _ in r.prefix("inodes", b"")}
            orphans = {int.from_bytes(k, "big") for k, _ in r.prefix("orphans", b"")}
            dirents = r.txn.stat(r._dbs["dirents"])["entries"]
            dirseq = r.txn.stat(r._dbs["dirseq"])["entries"]
        assert orphans <= set(self.held)
        assert stored == reachable | orphans, (stored - reachable, reachable - stored)
        assert dirents == names
        assert dirseq == names


_SETTINGS = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WorktreeModel.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, **_SETTINGS)
test_worktree_model = WorktreeModel.TestCase


class LazyWorktreeModel(WorktreeModel):
    """The same, plus reset --hard and new branches: directories then come back unloaded
    and are loaded lazily from their tree objects on first lookup."""

    check_leaks = False  # other branches hold inodes too

    def _load_snapshot(self) -> None:
        """The model after the worktree was replaced by the head's tree: trees do not
        record hard links, so every path is a file of its own."""
        while self.held:
            self.wt.release(self.held.pop())
        files, dirs = self.snapshot
        self.paths, self.data = {}, {}
        for path, content in files.items():
            self.paths[path] = self.next_key
            self.data[self.next_key] = bytearray(content)
            self.next_key += 1
        self.dirs = set(dirs)

    @rule()
    def reset_hard(self):
        """Discard the uncommitted changes: the root is reloaded lazily from the head."""
        while self.held:
            self.wt.release(self.held.pop())
        self.repo.reset(self.branch, hard=True)
        self._load_snapshot()
        assert self.repo.status(self.branch) == []

    @rule()
    def switch_branch(self):
        """Go on working on a new branch made from the head (uncommitted work stays)."""
        while self.held:
            self.wt.release(self.held.pop())
        name = f"b{len(self.repo.branches())}"
        self.repo.create_branch(name, self.branch)
        self.branch = name
        self.root = self.repo.root_ino(name)
        self._load_snapshot()


LazyWorktreeModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, derandomize=True,
    phases=[Phase.explicit, Phase.generate], **_SETTINGS)
test_lazy_worktree_model = LazyWorktreeModel.TestCase
