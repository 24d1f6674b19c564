"""A model test: random file system operations on a branch and on a local directory.

A Hypothesis state machine applies each operation twice, once to a local
directory (the model: the kernel's own file system) and once to the mounted
``main`` branch, and requires the same outcome: the same return value, or
the same errno.  After every step the two trees are compared (names, kinds,
modes, sizes, contents, symlink targets, link counts and which names are hard
links of each other).  A ``commit`` step runs ``jiaozifuse commit`` and
remembers the model's tree; later steps check that ``.commits/<id>`` still
shows exactly that tree.

One mount serves the whole run; the branch is emptied between examples.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .conftest import Mount, jz, start_mount, teardown

# ------------------------------------------------------------------ the world

NAMES = ("a", "b", "c")
PATHS = (
    [n for n in NAMES]
    + [f"{x}/{y}" for x in NAMES for y in NAMES]
    + [f"{x}/{y}/{z}" for x in NAMES[:2] for y in NAMES[:2] for z in NAMES[:2]]
)
# relative to the link's own directory: never escapes the tree
TARGETS = ("a", "b", "c", "a/b", "b/a", "missing", "/nonexistent-jz/x")
MODES = (0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o4755, 0o1777)
SIZES = (0, 1, 7, 4096, 65_537, 200_000)
OFFSETS = (0, 1, 100, 4095, 65_536, 131_071, 300_000)

#: A path is drawn as a number and resolved against the model's current tree
#: (see FsModel.existing / FsModel.fresh), so that most operations meet real
#: files and directories instead of failing with ENOENT; shrinking goes
#: towards 0, the first existing path.
paths = st.integers(0, 1 << 16)
datas = st.tuples(st.integers(0, 7), st.sampled_from(SIZES))
offsets = st.one_of(st.sampled_from(OFFSETS), st.integers(0, 400_000))


def payload(spec: tuple[int, int]) -> bytes:
    seed, n = spec
    return random.Random(seed).randbytes(n)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def _digest(p: str) -> str:
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def mtime(s: os.stat_result) -> int | str:
    return s.st_mtime_ns if s.st_mtime_ns < 1_000_000_000 * 10**9 else "now"


def walk(root: Path, snapshot: bool = False) -> dict[str, tuple]:
    """Everything comparable about a tree, keyed by relative path.

    For a commit snapshot: write bits are dropped (snapshots are read-only),
    and link counts are left out (a snapshot holds no hard links).

    Modification times are compared too, through :func:`mtime`: a time set by
    the ``utime`` rule (always before 2001) must stay exactly as set until an
    operation that POSIX says updates it; any later time counts as "now".
    """
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}

    def visit(d: str, rel: str) -> None:
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            r = f"{rel}{name}"
            s = os.lstat(p)
            mode = stat.S_IMODE(s.st_mode) & (~0o222 if snapshot else 0o7777)
            kind = stat.S_IFMT(s.st_mode)
            if stat.S_ISDIR(kind):
                row: tuple = ("dir", oct(mode), mtime(s))
                if not snapshot:
                    row += (s.st_nlink,)
                out[r] = row
                visit(p, r + "/")
            elif stat.S_ISLNK(kind):
                out[r] = ("link", os.readlink(p))
            elif stat.S_ISREG(kind):
                row = ("file", oct(mode), s.st_size, _digest(p), mtime(s))
                if not snapshot:
                    row += (s.st_nlink,)
                    inodes.setdefault(s.st_ino, []).append(r)
                out[r] = row
            else:
                out[r] = ("other", kind)

    visit(str(root), "")
    if not snapshot:
        for group in inodes.values():
            if len(group) > 1:
                for r in group:
                    out[r] += ("links", tuple(sorted(group)))
    return out


def walk_names(root: Path, dirs_only: bool = False) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        pre = "" if rel == "." else rel + "/"
        out += [pre + n for n in dirnames if not os.path.islink(os.path.join(dirpath, n))]
        if not dirs_only:
            out += [pre + n for n in filenames]
            out += [pre + n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]
    return out


def diff(a: dict, b: dict) -> str:
    keys = sorted(a.keys() | b.keys())
    return "\n".join(f"  {k}: model={a.get(k)} mount={b.get(k)}" for k in keys
                     if a.get(k) != b.get(k))


def renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def clear(root: Path) -> None:
    for name in os.listdir(root):
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ------------------------------------------------------------------ machine


class FsModel(RuleBasedStateMachine):
    mount: Mount
    local: Path

    def __init__(self) -> None:
        super().__init__()
        self.L = self.local
        self.R = self.mount.main
        # close what a failed example may have left open, then start empty
        clear(self.L)
        clear(self.R)
        assert os.listdir(self.R) == []
        for d in ("a", "b", "a/b"):
            self.both(lambda b, d=d: os.mkdir(b / d))
        for f, n in (("c", 10), ("a/c", 70_000), ("b/a", 0)):
            self.both(lambda b, f=f, n=n: (b / f).write_bytes(payload((1, n))))
        self.fds: list[tuple[int, int, str, int]] = []  # (local fd, mount fd, path, flags)
        self.commits: list[tuple[str, dict]] = []

    # ------------------------------------------------------------- helpers

    def existing(self, k: int) -> str:
        """Mostly a path that exists in the model; sometimes any path of the world."""
        have = sorted(walk_names(self.L))
        if have and k % 8 != 7:
            return have[(k // 8) % len(have)]
        return PATHS[(k // 8) % len(PATHS)]

    def fresh(self, k: int) -> str:
        """A name in an existing directory (which may or may not exist yet)."""
        dirs = ["", *sorted(r for r in walk_names(self.L, dirs_only=True) if r.count("/") < 2)]
        d = dirs[(k // 3) % len(dirs)]
        return f"{d}/{NAMES[k % 3]}" if d else NAMES[k % 3]

    def both(self, fn: Callable[[Path], Any]) -> Any:
        want = outcome(lambda: fn(self.L))
        got = outcome(lambda: fn(self.R))
        assert got == want, f"mount gave {got}, the local model {want}"
        return want

    def both_fd(self, i: int, fn: Callable[[int], Any]) -> Any:
        lfd, rfd, _, _ = self.fds[i % len(self.fds)]
        want = outcome(lambda: fn(lfd))
        got = outcome(lambda: fn(rfd))
        assert got == want, f"mount gave {got}, the local model {want}"
        return want

    # --------------------------------------------------------------- rules

    @rule(p=paths, off=offsets, data=datas, trunc=st.booleans())
    def write_at(self, p: int, off: int, data: tuple[int, int], trunc: bool) -> None:
        p = self.fresh(p) if p % 3 == 0 else self.existing(p)
        buf = payload(data)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)

        def fn(b: Path) -> int:
            fd = os.open(b / p, flags, 0o644)
            try:
                os.lseek(fd, off, os.SEEK_SET)
                return os.write(fd, buf)
            finally:
                os.close(fd)

        self.both(fn)

    @rule(p=paths, data=datas)
    def append(self, p: int, data: tuple[int, int]) -> None:
        p = self.fresh(p) if p % 3 == 0 else self.existing(p)
        buf = payload(data)

        def fn(b: Path) -> int:
            fd = os.open(b / p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, buf)
                return os.lseek(fd, 0, os.SEEK_CUR)
            finally:
                os.close(fd)

        self.both(fn)

    @rule(p=paths, size=st.sampled_from((0, 3, 5000, 70_000, 250_000)))
    def truncate(self, p: int, size: int) -> None:
        p = self.existing(p)
        self.both(lambda b: os.truncate(b / p, size))

    @rule(p=paths)
    def read(self, p: int) -> None:
        p = self.existing(p)
        self.both(lambda b: hashlib.sha256((b / p).read_bytes()).hexdigest())

    @rule(p=paths)
    def unlink(self, p: int) -> None:
        p = self.existing(p)
        self.both(lambda b: os.unlink(b / p))

    @rule(p=paths, mode=st.sampled_from((0o755, 0o700, 0o777)))
    def mkdir(self, p: int, mode: int) -> None:
        p = self.fresh(p) if p % 4 else self.existing(p)
        self.both(lambda b: os.mkdir(b / p, mode))

    @rule(p=paths)
    def rmdir(self, p: int) -> None:
        p = self.existing(p)
        self.both(lambda b: os.rmdir(b / p))

    @rule(src=paths, dst=paths)
    def rename(self, src: int, dst: int) -> None:
        src = self.existing(src)
        dst = self.fresh(dst) if dst % 2 else self.existing(dst)
        self.both(lambda b: os.rename(b / src, b / dst))

    @rule(src=paths, dst=paths)
    def link(self, src: int, dst: int) -> None:
        src = self.existing(src)
        dst = self.fresh(dst) if dst % 4 else self.existing(dst)
        self.both(lambda b: os.link(b / src, b / dst, follow_symlinks=False))

    @rule(dest=st.sampled_from(TARGETS), dst=paths)
    def symlink(self, dest: str, dst: int) -> None:
        dst = self.fresh(dst) if dst % 4 else self.existing(dst)
        self.both(lambda b: os.symlink(dest, b / dst))

    @rule(p=paths, mode=st.sampled_from(MODES))
    def chmod(self, p: int, mode: int) -> None:
        p = self.existing(p)
        self.both(lambda b: os.chmod(b / p, mode))

    @rule(p=paths, t=st.integers(1, 900_000_000))
    def utime(self, p: int, t: int) -> None:
        p = self.existing(p)
        ns = t * 1_000_000_000 + t % 1_000_000_000
        self.both(lambda b: os.utime(b / p, ns=(ns, ns)))

    @rule(src=paths, dst=paths)
    def rename_noreplace(self, src: int, dst: int) -> None:
        src = self.existing(src)
        dst = self.fresh(dst) if dst % 2 else self.existing(dst)
        self.both(lambda b: renameat2(b / src, b / dst, 1))

    @rule(p=paths)
    def listdir(self, p: int) -> None:
        p = self.existing(p)
        self.both(lambda b: sorted(os.listdir(b / p)))

    # ------------------------------------------------------ open file handles

    @precondition(lambda self: len(self.fds) < 3)
    @rule(p=paths, how=st.sampled_from(("rw", "append", "ro", "create")))
    def open_fd(self, p: int, how: str) -> None:
        p = self.existing(p) if how != "create" else self.fresh(p)
        flags = {"rw": os.O_RDWR, "append": os.O_RDWR | os.O_APPEND, "ro": os.O_RDONLY,
                 "create": os.O_RDWR | os.O_CREAT}[how]
        lo = outcome(lambda: os.open(self.L / p, flags, 0o644))
        ro = outcome(lambda: os.open(self.R / p, flags, 0o644))
        if lo[0] == "ok" and ro[0] == "ok":
            self.fds.append((lo[1], ro[1], p, flags))
            return
        for o in (lo, ro):
            if o[0] == "ok":
                os.close(o[1])
        assert ro == lo, f"open: mount gave {ro}, the local model {lo}"

    @rule(p=paths, off=offsets, data=datas)
    def open_unlink_use_close(self, p: int, off: int, data: tuple[int, int]) -> None:
        """The classic temp-file pattern: open, unlink, keep using the fd, close."""
        p = self.existing(p)
        buf = payload(data)

        def fn(b: Path) -> tuple:
            fd = os.open(b / p, os.O_RDWR)
            try:
                os.unlink(b / p)
                before = hashlib.sha256(os.pread(fd, 1 << 20, 0)).hexdigest()
                os.pwrite(fd, buf, off)
                s = os.fstat(fd)
                after = hashlib.sha256(os.pread(fd, 1 << 20, 0)).hexdigest()
                return before, after, s.st_size, s.st_nlink
            finally:
                os.close(fd)

        self.both(fn)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 2), off=offsets, data=datas)
    def fd_write(self, i: int, off: int, data: tuple[int, int]) -> None:
        buf = payload(data)

        def fn(fd: int) -> tuple[int, int]:
            os.lseek(fd, off, os.SEEK_SET)
            n = os.write(fd, buf)
            return n, os.lseek(fd, 0, os.SEEK_CUR)

        self.both_fd(i, fn)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 2), off=offsets, n=st.sampled_from((1, 100, 70_000, 1 << 20)))
    def fd_read(self, i: int, off: int, n: int) -> None:
        self.both_fd(i, lambda fd: hashlib.sha256(os.pread(fd, n, off)).hexdigest())

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 2), size=st.sampled_from((0, 10, 100_000)))
    def fd_truncate(self, i: int, size: int) -> None:
        self.both_fd(i, lambda fd: os.ftruncate(fd, size))

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 2))
    def fd_stat(self, i: int) -> None:
        def fn(fd: int) -> tuple:
            s = os.fstat(fd)
            return oct(s.st_mode), s.st_size, s.st_nlink

        self.both_fd(i, fn)

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 2), sync=st.booleans())
    def fd_close(self, i: int, sync: bool) -> None:
        lfd, rfd, _, flags = self.fds.pop(i % len(self.fds))
        if sync and flags & os.O_ACCMODE != os.O_RDONLY:
            os.fsync(lfd)
            os.fsync(rfd)
        os.close(lfd)
        os.close(rfd)

    # ---------------------------------------------------------------- commits

    @rule()
    def commit(self) -> None:
        res = self.mount.cli("commit", "--allow-empty", "-m", "model step", "--json")
        cid = json.loads(res.stdout)["id"]
        model = walk(self.L, snapshot=True)
        got = walk(self.mount.mnt / ".commits" / cid, snapshot=True)
        assert got == model, f"commit {cid[:12]} differs from the model:\n{diff(model, got)}"
        self.commits.append((cid, model))

    @precondition(lambda self: self.commits)
    @rule(i=st.integers(0, 10))
    def check_old_commit(self, i: int) -> None:
        cid, model = self.commits[i % len(self.commits)]
        got = walk(self.mount.mnt / ".commits" / cid[:10], snapshot=True)
        assert got == model, f"commit {cid[:12]} changed:\n{diff(model, got)}"

    # ------------------------------------------------------------- invariant

    @invariant()
    def same_tree(self) -> None:
        want, got = walk(self.L), walk(self.R)
        assert got == want, f"trees differ:\n{diff(want, got)}"

    def teardown(self) -> None:
        for lfd, rfd, _, _ in self.fds:
            for fd in (lfd, rfd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = []


# ------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def model_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Mount]]:
    """A one-element list holding the mount (a test may replace it by remounting)."""
    base = tmp_path_factory.mktemp("model")
    jz("init", str(base / "repo"))
    box = [start_mount(base / "repo", base / "mnt")]
    try:
        yield box
    finally:
        teardown(box[0])


@pytest.mark.timeout(900)  # about 1-2 minutes; more on a loaded 2-core machine
def test_branch_behaves_like_a_local_directory(model_mount: list[Mount], tmp_path: Path) -> None:
    local = tmp_path / "model"
    local.mkdir()
    FsModel.mount = model_mount[0]
    FsModel.local = local
    run_state_machine_as_test(FsModel, settings=settings(
        # JZ_MODEL_EXAMPLES=500 for a longer hunt outside the suite
        max_examples=int(os.environ.get("JZ_MODEL_EXAMPLES", "25")), stateful_step_count=30,
        deadline=None,
        suppress_health_check=list(HealthCheck)))
    # the last example's tree (its fds are closed) survives a remount unchanged
    want = walk(local)
    assert walk(model_mount[0].main) == want
    model_mount[0] = model_mount[0].remount()
    got = walk(model_mount[0].main)
    assert got == want, f"after a remount:\n{diff(want, got)}"
    # no handler failed unexpectedly (which would be an EIO and a traceback)
    log = (model_mount[0].repo / "run" / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
