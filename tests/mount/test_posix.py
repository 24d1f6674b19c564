"""POSIX behaviour of a branch directory, checked against a local directory.

Every case runs the same calls once in a fresh local directory (ext4/tmpfs
under pytest's tmp_path) and once in a fresh directory of a mounted branch,
and compares the outcomes: the value returned, or the errno raised.

One mount (with ``--allow-other``, so that an unprivileged child process can
use it) serves the whole module; tests that need a remount use the
function-scoped ``mnt`` fixture.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Mount, jz, start_mount, teardown

# ------------------------------------------------------------------ fixtures


class Shared:
    """One mount for the module; remounted if an earlier test killed it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        jz("init", str(base / "repo"))
        self.m = start_mount(base / "repo", base / "mnt", "--allow-other")

    def get(self) -> Mount:
        try:
            os.stat(self.m.mnt / ".jiaozifuse-mount")
        except OSError:
            teardown(self.m)
            self.m = start_mount(self.base / "repo", self.base / "mnt", "--allow-other")
        return self.m


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    # Not under pytest's tmp_path: its parents are 0700, and the unprivileged
    # child processes of some tests must reach both directories.
    base = Path(tempfile.mkdtemp(prefix="jz-posix-"))
    os.chmod(base, 0o755)
    s = Shared(base)
    try:
        yield s
    finally:
        teardown(s.m)
        shutil.rmtree(base, ignore_errors=True)


_counter = itertools.count()


@pytest.fixture
def pair(shared: Shared) -> tuple[Path, Path]:
    """(local dir, branch dir): both fresh, empty, mode 0777 (for the non-root cases)."""
    n = next(_counter)
    local = shared.base / "local" / f"t{n}"
    local.mkdir(parents=True)
    os.chmod(local.parent, 0o755)
    remote = shared.get().main / f"t{n}"
    remote.mkdir()
    for d in (local, remote):
        os.chmod(d, 0o777)
    return local, remote


def outcome(fn: Callable[[Path], Any], base: Path) -> tuple[str, Any]:
    try:
        return ("ok", fn(base))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def same(pair: tuple[Path, Path], fn: Callable[[Path], Any]) -> tuple[str, Any]:
    """Run *fn* in both directories; assert equal outcomes; return the local one."""
    local, remote = pair
    want = outcome(fn, local)
    got = outcome(fn, remote)
    assert got == want, f"mount gave {got}, a local directory {want}"
    return want


def run_as(uid: int, gid: int, fn: Callable[[], Any]) -> Any:
    """Run *fn* in a forked child with dropped privileges; return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            res: Any = fn()
        except OSError as exc:
            res = ["err", errno.errorcode.get(exc.errno, exc.errno)]
        except BaseException as exc:
            res = ["exc", repr(exc)]
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def errname(fn: Callable[[], Any]) -> Any:
    try:
        return ["ok", fn()]
    except OSError as exc:
        return ["err", errno.errorcode.get(exc.errno, exc.errno)]


# ---------------------------------------------------------------- errno table


def _setup(b: Path) -> None:
    (b / "d" / "sub").mkdir(parents=True)
    (b / "d" / "sub" / "x").write_text("x")
    (b / "e").mkdir()
    (b / "f").write_text("file")
    (b / "g").write_text("other")
    os.symlink("nowhere", b / "dangling")
    os.symlink("f", b / "lf")


def _open_close(p: Path, flags: int, mode: int = 0o644) -> None:
    os.close(os.open(p, flags, mode))


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _write_ro(b: Path) -> None:
    fd = os.open(b / "f", os.O_RDONLY)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def _read_wo(b: Path) -> bytes:
    fd = os.open(b / "f", os.O_WRONLY)
    try:
        return os.read(fd, 1)
    finally:
        os.close(fd)


def _read_dir(b: Path) -> bytes:
    fd = os.open(b / "d", os.O_RDONLY)
    try:
        return os.read(fd, 1)
    finally:
        os.close(fd)


def _ftruncate_ro(b: Path) -> None:
    fd = os.open(b / "f", os.O_RDONLY)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _create_in_removed_dir(b: Path) -> None:
    (b / "gone").mkdir()
    dfd = os.open(b / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(b / "gone")
        os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)


def _rename_hardlink_noop(b: Path) -> tuple[bool, bool, int]:
    os.link(b / "f", b / "f2")
    os.rename(b / "f", b / "f2")
    return (b / "f").exists(), (b / "f2").exists(), os.stat(b / "f2").st_nlink


LONG = "n" * 256
CASES: list[tuple[str, Callable[[Path], Any]]] = [
    ("create_256", lambda b: _open_close(b / LONG, os.O_CREAT | os.O_WRONLY)),
    ("mkdir_256", lambda b: os.mkdir(b / LONG)),
    ("symlink_256", lambda b: os.symlink("f", b / LONG)),
    ("link_256", lambda b: os.link(b / "f", b / LONG)),
    ("rename_to_256", lambda b: os.rename(b / "f", b / LONG)),
    ("stat_256", lambda b: os.stat(b / LONG)),
    ("unlink_256", lambda b: os.unlink(b / LONG)),
    ("name_255", lambda b: (b / ("m" * 255)).write_text("ok") and sorted(os.listdir(b))[-1]),
    ("rmdir_nonempty", lambda b: os.rmdir(b / "d")),
    ("rmdir_empty", lambda b: (os.rmdir(b / "e"), (b / "e").exists())[1]),
    ("rmdir_file", lambda b: os.rmdir(b / "f")),
    ("rmdir_missing", lambda b: os.rmdir(b / "missing")),
    ("rmdir_dot", lambda b: os.rmdir(b / "d" / ".")),
    ("rmdir_symlink", lambda b: os.rmdir(b / "lf")),
    ("unlink_dir", lambda b: os.unlink(b / "d")),
    ("unlink_missing", lambda b: os.unlink(b / "missing")),
    ("rename_dir_into_itself", lambda b: os.rename(b / "d", b / "d" / "inside")),
    ("rename_dir_into_subdir", lambda b: os.rename(b / "d", b / "d" / "sub" / "deeper")),
    ("rename_dir_onto_itself",
     lambda b: (os.rename(b / "d", b / "d"), (b / "d/sub/x").exists())[1]),
    ("rename_file_over_dir", lambda b: os.rename(b / "f", b / "e")),
    ("rename_dir_over_file", lambda b: os.rename(b / "e", b / "f")),
    ("rename_dir_over_nonempty", lambda b: os.rename(b / "e", b / "d")),
    ("rename_dir_over_empty", lambda b: (os.rename(b / "d", b / "e"), sorted(os.listdir(b)))[1]),
    ("rename_file_over_file", lambda b: (os.rename(b / "f", b / "g"), (b / "g").read_text())[1]),
    ("rename_missing", lambda b: os.rename(b / "missing", b / "x")),
    ("rename_into_missing_dir", lambda b: os.rename(b / "f", b / "missing" / "x")),
    ("rename_under_file", lambda b: os.rename(b / "g", b / "f" / "x")),
    ("rename_hardlink_noop", _rename_hardlink_noop),
    ("rename_noreplace", lambda b: _renameat2(b / "f", b / "g", 1)),
    ("rename_noreplace_ok", lambda b: (_renameat2(b / "f", b / "h", 1), (b / "h").read_text())[1]),
    ("open_dir_wronly", lambda b: _open_close(b / "d", os.O_WRONLY)),
    ("open_dir_rdwr", lambda b: _open_close(b / "d", os.O_RDWR)),
    ("open_file_o_directory", lambda b: _open_close(b / "f", os.O_RDONLY | os.O_DIRECTORY)),
    ("path_through_file", lambda b: os.stat(b / "f" / "x")),
    ("create_under_file", lambda b: _open_close(b / "f" / "x", os.O_CREAT | os.O_WRONLY)),
    ("mkdir_under_file", lambda b: os.mkdir(b / "f" / "x")),
    ("stat_file_trailing_slash", lambda b: os.stat(str(b / "f") + "/")),
    ("create_trailing_slash",
     lambda b: _open_close(str(b / "new") + "/", os.O_CREAT | os.O_WRONLY)),
    ("listdir_file", lambda b: os.listdir(b / "f")),
    ("read_dir_fd", _read_dir),
    ("o_excl_existing", lambda b: _open_close(b / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    ("o_excl_dangling_symlink",
     lambda b: _open_close(b / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    ("o_creat_dangling_symlink",
     lambda b: (_open_close(b / "dangling", os.O_CREAT | os.O_WRONLY), sorted(os.listdir(b)))[1]),
    ("o_excl_dir", lambda b: _open_close(b / "d", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    ("o_nofollow_symlink", lambda b: _open_close(b / "lf", os.O_RDONLY | os.O_NOFOLLOW)),
    ("mkdir_existing", lambda b: os.mkdir(b / "f")),
    ("mkdir_existing_dir", lambda b: os.mkdir(b / "d")),
    ("mkdir_missing_parent", lambda b: os.mkdir(b / "missing" / "x")),
    ("symlink_existing", lambda b: os.symlink("x", b / "f")),
    ("link_existing", lambda b: os.link(b / "f", b / "g")),
    ("link_dir", lambda b: os.link(b / "d", b / "dl")),
    ("link_missing", lambda b: os.link(b / "missing", b / "x")),
    ("readlink_file", lambda b: os.readlink(b / "f")),
    ("readlink_dangling", lambda b: os.readlink(b / "dangling")),
    ("symlink_4000", lambda b: (os.symlink("t" * 4000, b / "ls"), len(os.readlink(b / "ls")))[1]),
    ("symlink_5000", lambda b: os.symlink("t" * 5000, b / "ls")),
    ("truncate_dir", lambda b: os.truncate(b / "d", 0)),
    ("truncate_negative", lambda b: os.truncate(b / "f", -1)),
    ("write_rdonly_fd", _write_ro),
    ("read_wronly_fd", _read_wo),
    ("ftruncate_rdonly_fd", _ftruncate_ro),
    ("create_in_removed_dir", _create_in_removed_dir),
    ("mkfifo", lambda b: (os.mkfifo(b / "fifo"), stat.S_ISFIFO(os.lstat(b / "fifo").st_mode))[1]),
]
XFAIL: dict[str, str] = {}  # case id -> reason, for bugs not fixed yet
PARAMS = [pytest.param(name, fn, id=name,
                       marks=[pytest.mark.xfail(reason=XFAIL[name], strict=True)]
                       if name in XFAIL else [])
          for name, fn in CASES]


@pytest.mark.parametrize(("name", "fn"), PARAMS)
def test_errno_table(pair: tuple[Path, Path], name: str, fn: Callable[[Path], Any]) -> None:
    for b in pair:
        _setup(b)
    same(pair, fn)


def test_unix_socket_in_branch(pair: tuple[Path, Path]) -> None:
    """A program binding a unix socket in its working directory (gpg-agent, tmux, ...)."""
    import socket

    def bind(b: Path) -> tuple:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(b / "sock"))
            s.listen(1)
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(b / "sock"))
                conn, _ = s.accept()
                c.sendall(b"ping")
                got = conn.recv(4)
                conn.close()
        st = os.lstat(b / "sock")
        return stat.S_ISSOCK(st.st_mode), got, sorted(os.listdir(b))

    assert same(pair, bind) == ("ok", (True, b"ping", ["sock"]))


def _o_direct(b: Path) -> tuple:
    fd = os.open(b / "od", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        buf = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT wants
        buf.write(b"x" * 8192)
        n = os.write(fd, buf)
        os.lseek(fd, 0, os.SEEK_SET)
        rb = mmap.mmap(-1, 8192)
        m = os.readv(fd, [rb])
    finally:
        os.close(fd)
    return n, m, rb[:3], os.path.getsize(b / "od")


def _touch_a_then_m(b: Path) -> tuple:
    (b / "tm").write_text("")
    os.utime(b / "tm", ns=(100, 200))
    subprocess.run(["touch", "-a", "-d", "@5", str(b / "tm")], check=True)
    a = os.stat(b / "tm")
    subprocess.run(["touch", "-m", "-d", "@7", str(b / "tm")], check=True)
    m = os.stat(b / "tm")
    return (a.st_atime_ns, a.st_mtime_ns), (m.st_atime_ns, m.st_mtime_ns)


def _chown_one_id(b: Path) -> tuple:
    (b / "ck").write_text("")
    os.chown(b / "ck", 1000, -1)
    s1 = os.stat(b / "ck")
    os.chown(b / "ck", -1, 1002)
    s2 = os.stat(b / "ck")
    os.symlink("nowhere", b / "ls")
    os.lchown(b / "ls", 1003, 1004)
    s3 = os.lstat(b / "ls")
    return (s1.st_uid, s1.st_gid), (s2.st_uid, s2.st_gid), (s3.st_uid, s3.st_gid)


def _rename_dir_updates_dotdot(b: Path) -> tuple:
    os.makedirs(b / "r1" / "x")
    os.mkdir(b / "r2")
    os.rename(b / "r1" / "x", b / "r2" / "x")
    return (os.path.samefile(b / "r2" / "x" / "..", b / "r2"),
            os.stat(b / "r1").st_nlink, os.stat(b / "r2").st_nlink)


def _cwd_survives_rename_and_rmdir(b: Path) -> tuple:
    os.makedirs(b / "cw" / "in")
    os.mkdir(b / "rc")
    here = os.getcwd()
    try:
        os.chdir(b / "cw" / "in")
        os.rename(b / "cw", b / "cw2")
        moved = os.path.relpath(os.getcwd(), b)
        os.chdir(b / "rc")
        os.rmdir(b / "rc")
        try:
            open("x", "w").close()
            created = "created"
        except OSError as exc:
            created = errno.errorcode[exc.errno]
    finally:
        os.chdir(here)
    return moved, created


def _reads_and_writes_at_the_edges(b: Path) -> tuple:
    (b / "pp").write_text("abc")
    fd = os.open(b / "pp", os.O_RDWR)
    try:
        r = os.pread(fd, 10, 100), os.pread(fd, 10, 2)
        os.lseek(fd, 1000, os.SEEK_SET)
        n = os.write(fd, b"")  # a zero-length write does not extend the file
        size = os.fstat(fd).st_size
        os.posix_fallocate(fd, 0, 100_000)
        falloc = os.fstat(fd).st_size, os.pread(fd, 4, 0)
    finally:
        os.close(fd)
    return r, n, size, falloc


def _nlink_of_replaced_open_file(b: Path) -> int:
    (b / "n1").write_text("")
    (b / "n2").write_text("")
    fd = os.open(b / "n2", os.O_RDONLY)
    try:
        os.rename(b / "n1", b / "n2")
        return os.fstat(fd).st_nlink
    finally:
        os.close(fd)


BEHAVIOUR = [
    ("o_direct", _o_direct),
    ("touch_a_then_m", _touch_a_then_m),
    ("chown_one_id_and_lchown", _chown_one_id),
    ("rename_dir_updates_dotdot", _rename_dir_updates_dotdot),
    ("cwd_survives_rename_and_rmdir", _cwd_survives_rename_and_rmdir),
    ("reads_and_writes_at_the_edges", _reads_and_writes_at_the_edges),
    ("nlink_of_replaced_open_file", _nlink_of_replaced_open_file),
]


@pytest.mark.parametrize(("name", "fn"), BEHAVIOUR, ids=[n for n, _ in BEHAVIOUR])
def test_behaviour_table(pair: tuple[Path, Path], name: str, fn: Callable[[Path], Any]) -> None:
    same(pair, fn)


def test_snapshot_directory_link_counts(shared: Shared) -> None:
    m = shared.get()
    d = m.main / "nl"
    (d / "x" / "y").mkdir(parents=True)
    (d / "z").mkdir()
    cid = json.loads(m.cli("commit", "--allow-empty", "-m", "nl", "--json").stdout)["id"]
    snap = m.mnt / ".commits" / cid / "nl"
    assert [os.stat(p).st_nlink for p in (d, d / "x", d / "z")] == [4, 3, 2]
    assert [os.stat(p).st_nlink for p in (snap, snap / "x", snap / "z")] == [4, 3, 2]


# -------------------------------------------------------------- sparse files


def _sparse(b: Path) -> tuple[int, bool, bytes]:
    fd = os.open(b / "sp", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.lseek(fd, 64 << 20, os.SEEK_SET)
        os.write(fd, b"end")
        os.pwrite(fd, b"start", 0)
    finally:
        os.close(fd)
    with open(b / "sp", "rb") as f:
        f.seek(30 << 20)
        zeros = f.read(1 << 20) == bytes(1 << 20)
        f.seek((64 << 20) - 2)
        tail = f.read()
    return os.stat(b / "sp").st_size, zeros, tail


def test_sparse_file_size_and_zeros(pair: tuple[Path, Path]) -> None:
    assert same(pair, _sparse) == ("ok", ((64 << 20) + 3, True, b"\0\0end"))
    for b in pair:
        with open(b / "sp", "rb") as f:
            assert f.read(7) == b"start\0\0"


def test_sparse_file_blocks(pair: tuple[Path, Path]) -> None:
    local, remote = pair
    for b in pair:
        _sparse(b)
    assert os.stat(local / "sp").st_blocks < 1024
    # allow generous overhead, but a 64 MiB hole must not count as 64 MiB of blocks
    assert os.stat(remote / "sp").st_blocks * 512 < (8 << 20)


def test_st_blocks_of_dense_file(pair: tuple[Path, Path]) -> None:
    for b in pair:
        (b / "dense").write_bytes(os.urandom(100_000))
        st = os.stat(b / "dense")
        assert st.st_blocks * 512 >= st.st_size
        assert st.st_blocks * 512 <= st.st_size + (1 << 20)


# ---------------------------------------------------------------- file I/O


def test_o_trunc(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple[bytes, int, bytes]:
        (b / "t").write_bytes(b"hello world" * 1000)
        fd = os.open(b / "t", os.O_WRONLY | os.O_TRUNC)
        size_after_open = os.fstat(fd).st_size
        os.write(fd, b"hi")
        os.close(fd)
        # O_TRUNC on an O_RDONLY open: Linux truncates too (unspecified by POSIX)
        (b / "u").write_bytes(b"abc")
        return (b / "t").read_bytes(), size_after_open, (b / "u").read_bytes()

    assert same(pair, fn) == ("ok", (b"hi", 0, b"abc"))


def test_o_append_two_fds(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple[bytes, int, int]:
        a = os.open(b / "ap", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        c = os.open(b / "ap", os.O_WRONLY | os.O_APPEND)
        plain = os.open(b / "ap", os.O_WRONLY)
        try:
            for i in range(20):
                os.write(a, b"A%02d" % i)
                os.write(c, b"C%02d-" % i)
            os.write(plain, b"PP")  # at offset 0, overwriting
            os.lseek(a, 0, os.SEEK_SET)
            os.write(a, b"Z")  # O_APPEND ignores the seek
            pos = os.lseek(a, 0, os.SEEK_CUR)
            size = os.fstat(c).st_size
        finally:
            for fd in (a, c, plain):
                os.close(fd)
        return (b / "ap").read_bytes(), pos, size

    data, pos, size = same(pair, fn)[1]
    assert pos == size == len(data) and data.endswith(b"Z") and data.startswith(b"PP")


def test_truncate_through_fd(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        fd = os.open(b / "ft", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.write(fd, os.urandom(1) * 0 + b"abcdef" * 50_000)
            os.ftruncate(fd, 3)
            a = os.pread(fd, 10, 0), os.fstat(fd).st_size
            os.ftruncate(fd, 200_000)
            b_ = os.pread(fd, 8, 0), os.pread(fd, 4, 199_998), os.fstat(fd).st_size
            os.write(fd, b"W")  # file offset is still past the new end: a hole
            c = os.fstat(fd).st_size
        finally:
            os.close(fd)
        data = (b / "ft").read_bytes()
        return a, b_, c, data[:3], data.count(0), data[-1:]

    same(pair, fn)


def test_unlink_open_file(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        (b / "uo").write_bytes(b"data" * 100_000)
        fd = os.open(b / "uo", os.O_RDWR)
        try:
            os.unlink(b / "uo")
            gone = (b / "uo").exists(), os.listdir(b)
            r1 = os.pread(fd, 8, 0)
            os.pwrite(fd, b"XY", 400_000)
            st = os.fstat(fd)
            os.fchmod(fd, 0o600)
            mode = oct(os.fstat(fd).st_mode)
            os.ftruncate(fd, 6)
            r2 = os.pread(fd, 100, 0)
            # the name can be reused while the orphan is open
            (b / "uo").write_text("new")
            r3 = os.pread(fd, 100, 0)
        finally:
            os.close(fd)
        return gone, r1, st.st_nlink, st.st_size, mode, r2, r3, (b / "uo").read_text()

    same(pair, fn)


def test_rename_over_open_file(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        (b / "victim").write_bytes(b"old" * 50_000)
        fd = os.open(b / "victim", os.O_RDWR)
        try:
            (b / "new").write_bytes(b"new")
            os.rename(b / "new", b / "victim")
            os.pwrite(fd, b"still-writable", 0)
            return os.pread(fd, 20, 0), os.fstat(fd).st_nlink, (b / "victim").read_bytes()
        finally:
            os.close(fd)

    same(pair, fn)


def test_hard_links_share_data(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        (b / "h1").write_text("one")
        os.mkdir(b / "sub")
        os.link(b / "h1", b / "sub" / "h2")
        with open(b / "sub" / "h2", "a") as f:
            f.write("two")
        r = (b / "h1").read_text(), os.stat(b / "h1").st_nlink
        same_ino = os.stat(b / "h1").st_ino == os.stat(b / "sub" / "h2").st_ino
        os.chmod(b / "h1", 0o600)
        mode = oct(os.stat(b / "sub" / "h2").st_mode)
        os.unlink(b / "h1")
        return r, same_ino, mode, (b / "sub" / "h2").read_text(), os.stat(b / "sub/h2").st_nlink

    same(pair, fn)


def test_dir_nlink_and_parent_times(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        os.makedirs(b / "p" / "q" / "r")
        os.mkdir(b / "p" / "s")
        n1 = os.stat(b / "p").st_nlink, os.stat(b / "p" / "q").st_nlink
        os.rename(b / "p" / "q", b / "q")
        n2 = os.stat(b / "p").st_nlink, os.stat(b / "q").st_nlink
        os.utime(b / "p", ns=(0, 0))
        (b / "p" / "file").write_text("x")
        t1 = os.stat(b / "p").st_mtime_ns > 0
        os.utime(b / "p", ns=(0, 0))
        os.rename(b / "p" / "file", b / "p" / "file2")
        t2 = os.stat(b / "p").st_mtime_ns > 0
        os.utime(b / "p", ns=(0, 0))
        os.utime(b / "p" / "file2", ns=(1, 1))
        t3 = os.stat(b / "p").st_mtime_ns
        return n1, n2, t1, t2, t3

    same(pair, fn)


def test_large_file_random_io(pair: tuple[Path, Path]) -> None:
    """Past the in-memory write buffer: 24 MiB sequential, then scattered writes and reads."""
    import random

    def fn(b: Path) -> tuple:
        rng = random.Random(7)
        fd = os.open(b / "large", os.O_CREAT | os.O_RDWR, 0o644)
        reads = []
        try:
            for _ in range(24):
                os.write(fd, rng.randbytes(1 << 20))
            for _ in range(40):
                os.pwrite(fd, rng.randbytes(rng.randrange(1, 2 << 20)),
                          rng.randrange(0, 26 << 20))
                data = os.pread(fd, 200_000, rng.randrange(0, 26 << 20))
                reads.append(hashlib.sha256(data).hexdigest()[:12])
            os.ftruncate(fd, (13 << 20) + 7)
            os.pwrite(fd, b"end", 20 << 20)
        finally:
            os.close(fd)
        with open(b / "large", "rb") as f:
            whole = hashlib.sha256(f.read()).hexdigest()
        return reads, whole, os.path.getsize(b / "large")

    same(pair, fn)


def test_readdir_while_the_directory_changes(pair: tuple[Path, Path]) -> None:
    """Entries neither removed nor added during a listing appear exactly once (POSIX)."""

    def fn(b: Path) -> bool:
        d = b / "many"
        d.mkdir()
        names = [f"f{i:04}" for i in range(600)]
        for n in names:
            (d / n).write_bytes(b"")
        removed = set(names[1::3])
        seen: list[str] = []
        with os.scandir(d) as it:
            for e in it:
                seen.append(e.name)
                if len(seen) == 150:
                    for n in sorted(removed):
                        os.unlink(d / n)
                    for i in range(200):
                        (d / f"new{i:03}").write_bytes(b"")
                    os.rename(d / names[0], d / "renamed")
        untouched = set(names) - removed - {names[0]}
        assert len(seen) == len(set(seen)), "an entry was listed twice"
        assert untouched <= set(seen), f"{len(untouched - set(seen))} entries were skipped"
        assert sorted(os.listdir(d)) == sorted(
            (set(names) - removed - {names[0]}) | {f"new{i:03}" for i in range(200)}
            | {"renamed"})
        return True

    assert same(pair, fn) == ("ok", True)


# -------------------------------------------------------------------- mmap


def _mmap_write(p: Path) -> None:
    with open(p, "wb") as f:
        f.write(b"a" * 300_000)
    fd = os.open(p, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 300_000, mmap.MAP_SHARED)
        m[150_000:150_005] = b"HELLO"
        m[-10:] = b"Z" * 10
        m[:3] = b"top"
        m.flush()  # msync
        seen = m[149_998:150_007]
        m.close()
    finally:
        os.close(fd)
    assert seen == b"aaHELLOaa"


def _mmap_expected() -> bytes:
    want = bytearray(b"a" * 300_000)
    want[150_000:150_005] = b"HELLO"
    want[-10:] = b"Z" * 10
    want[:3] = b"top"
    return bytes(want)


def test_mmap_read(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        data = os.urandom(200_000)
        (b / "mr").write_bytes(data)
        with open(b / "mr", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m[:] == data, len(m), m.find(data[123_456:123_470]) == 123_456

    assert same(pair, fn) == ("ok", (True, 200_000, True))


def test_mmap_write_survives_close_and_remount(mnt: Mount) -> None:
    p = mnt.main / "mw"
    _mmap_write(p)
    assert p.read_bytes() == _mmap_expected()
    m2 = mnt.remount()
    assert (m2.main / "mw").read_bytes() == _mmap_expected()


def test_mmap_shared_between_fds(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        fd = os.open(b / "ms", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.ftruncate(fd, 8192)
            with mmap.mmap(fd, 8192) as m:
                m[4000:4004] = b"abcd"
                # read() through another fd sees the mapped write at once
                fd2 = os.open(b / "ms", os.O_RDONLY)
                try:
                    r = os.pread(fd2, 4, 4000)
                finally:
                    os.close(fd2)
                os.pwrite(fd, b"WXYZ", 100)
                mapped = m[100:104]
        finally:
            os.close(fd)
        return r, mapped, os.stat(b / "ms").st_size

    assert same(pair, fn) == ("ok", (b"abcd", b"WXYZ", 8192))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fsync_is_durable_across_a_daemon_crash(mnt: Mount) -> None:
    """What sqlite, git and atomic savers rely on: fsync'd data survives a kill -9."""
    import signal

    m = mnt.main
    fd = os.open(m / "synced", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"durable" * 1000)
    os.fsync(fd)
    os.close(fd)
    (m / "doc").write_text("old")
    _fsync_dir(m)
    fd = os.open(m / "doc.tmp", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"new")
    os.fsync(fd)
    os.close(fd)
    os.rename(m / "doc.tmp", m / "doc")
    _fsync_dir(m)
    os.mkdir(m / "newdir")
    os.link(m / "synced", m / "newdir" / "link")
    os.chmod(m / "synced", 0o600)
    _fsync_dir(m / "newdir")
    _fsync_dir(m)
    still_open = os.open(m / "open", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(still_open, b"A" * 100_000)
    os.fsync(still_open)
    os.kill(mnt.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.close(still_open)
    m2 = mnt.remount()
    assert (m2.main / "synced").read_bytes() == b"durable" * 1000
    assert (m2.main / "doc").read_text() == "new"
    assert not (m2.main / "doc.tmp").exists()
    assert os.stat(m2.main / "newdir" / "link").st_nlink == 2
    assert stat.S_IMODE(os.stat(m2.main / "synced").st_mode) == 0o600
    assert (m2.main / "open").read_bytes() == b"A" * 100_000


# ------------------------------------------------------------------- locks


def _try_lock_in_child(path: Path, how: str) -> str:
    code = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    if sys.argv[2] == 'flock':\n"
        "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    elif sys.argv[2] == 'posix':\n"
        "        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)\n"
        "    elif sys.argv[2] == 'posix_other_range':\n"
        "        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 100)\n"
        "    elif sys.argv[2] == 'posix_getlk':\n"
        "        import struct\n"
        "        arg = struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 10, 0)\n"
        "        res = fcntl.fcntl(fd, fcntl.F_GETLK, arg)\n"
        "        t, w, s, ln, pid = struct.unpack('hhqqi', res)\n"
        "        print('getlk', t == fcntl.F_UNLCK, s, ln, pid == int(sys.argv[3])); sys.exit()\n"
        "    print('locked')\n"
        "except OSError as e:\n"
        "    print(__import__('errno').errorcode[e.errno])\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path), how, str(os.getpid())],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_flock_between_processes(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        (b / "lk").write_text("")
        fd = os.open(b / "lk", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = _try_lock_in_child(b / "lk", "flock")
            fcntl.flock(fd, fcntl.LOCK_UN)
            free = _try_lock_in_child(b / "lk", "flock")
        finally:
            os.close(fd)
        return held, free

    assert same(pair, fn) == ("ok", ("EAGAIN", "locked"))


def test_fcntl_locks_between_processes(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        (b / "lk").write_text("")
        fd = os.open(b / "lk", os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
            held = _try_lock_in_child(b / "lk", "posix")
            other = _try_lock_in_child(b / "lk", "posix_other_range")
            getlk = _try_lock_in_child(b / "lk", "posix_getlk")
            fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
            free = _try_lock_in_child(b / "lk", "posix")
        finally:
            os.close(fd)
        return held, other, getlk, free

    assert same(pair, fn) == ("ok", ("EAGAIN", "locked", "getlk False 0 10 True", "locked"))


# ------------------------------------------------------------------ xattrs


def test_user_xattrs(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        p = b / "x"
        p.write_text("x")
        os.mkdir(b / "dir")
        os.symlink("x", b / "sl")
        out: list[Any] = []
        os.setxattr(p, "user.a", b"1")
        os.setxattr(p, "user.empty", b"")
        os.setxattr(p, "user.bin", bytes(range(256)))
        os.setxattr(b / "dir", "user.d", b"dirval")
        out.append(sorted(os.listxattr(p)))
        out.append([os.getxattr(p, n) for n in ("user.a", "user.empty", "user.bin")])
        out.append(errname(lambda: os.getxattr(p, "user.missing")))
        out.append(errname(lambda: os.setxattr(p, "user.a", b"2", os.XATTR_CREATE)))
        out.append(errname(lambda: os.setxattr(p, "user.new", b"2", os.XATTR_REPLACE)))
        os.setxattr(p, "user.a", b"replaced", os.XATTR_REPLACE)
        out.append(os.getxattr(p, "user.a"))
        os.removexattr(p, "user.a")
        out.append(errname(lambda: os.removexattr(p, "user.a")))
        out.append(sorted(os.listxattr(p)))
        out.append(os.getxattr(b / "dir", "user.d"))
        # user.* xattrs are not allowed on symlinks (Linux)
        out.append(errname(lambda: os.setxattr(b / "sl", "user.s", b"1", follow_symlinks=False)))
        # a value bigger than the caller's buffer: ERANGE through the raw syscall
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(4)
        n = libc.getxattr(os.fsencode(p), b"user.bin", buf, 4)
        out.append(["len", n, errno.errorcode.get(ctypes.get_errno(), 0) if n < 0 else None])
        n = libc.getxattr(os.fsencode(p), b"user.bin", None, 0)
        out.append(["size query", n])
        # xattrs survive a rename and belong to the inode (shared by a hard link)
        os.rename(p, b / "y")
        os.link(b / "y", b / "z")
        out.append(os.getxattr(b / "z", "user.bin") == bytes(range(256)))
        return out

    same(pair, fn)


def test_xattr_unknown_namespace(pair: tuple[Path, Path]) -> None:
    """Names outside user/trusted/security/system: EOPNOTSUPP, as on a local fs."""
    def fn(b: Path) -> None:
        (b / "x").write_text("x")
        os.setxattr(b / "x", "bogus.name", b"1")

    same(pair, fn)


# 'u::rw-,g::r--,o::---' in the kernel's binary format (version 2)
ACL_0640 = (b"\x02\x00\x00\x00" b"\x01\x00\x06\x00\xff\xff\xff\xff"
            b"\x04\x00\x04\x00\xff\xff\xff\xff" b"\x20\x00\x00\x00\xff\xff\xff\xff")


def test_posix_acl_xattr_sets_mode(pair: tuple[Path, Path]) -> None:
    """cp -a, cp -p and sed -i set modes through this xattr: it must not be a silent no-op."""
    def fn(b: Path) -> Any:
        (b / "a").write_text("x")
        os.chmod(b / "a", 0o644)
        try:
            os.setxattr(b / "a", "system.posix_acl_access", ACL_0640)
        except OSError as exc:
            # refusing ACLs is fine too: tools then fall back to chmod
            return ["refused", exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP)]
        return oct(stat.S_IMODE(os.stat(b / "a").st_mode))

    local, remote = pair
    assert outcome(fn, local) == ("ok", "0o640")
    assert outcome(fn, remote) in (("ok", "0o640"), ("ok", ["refused", True]))


# ----------------------------------------------------------- times, owners


def test_read_updates_atime_under_relatime(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> bool:
        (b / "at").write_text("x")
        os.utime(b / "at", ns=(1_000_000_000, 2_000_000_000))  # atime older than mtime
        with open(b / "at", "rb") as f:
            f.read()
        return os.stat(b / "at").st_atime_ns > 2_000_000_000

    assert same(pair, fn) == ("ok", True)


def test_utime_ns_precision(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        (b / "u").write_text("x")
        os.mkdir(b / "ud")
        os.symlink("u", b / "us")
        out = []
        for p in ("u", "ud"):
            os.utime(b / p, ns=(1_234_567_891_123_456_789, 987_654_321_987_654_321))
            st = os.stat(b / p)
            out.append((st.st_atime_ns, st.st_mtime_ns))
        os.utime(b / "us", ns=(5, 1_000_000_001), follow_symlinks=False)
        st = os.lstat(b / "us")
        out.append((st.st_atime_ns, st.st_mtime_ns, os.stat(b / "us").st_mtime_ns))
        # pre-1970
        os.utime(b / "u", ns=(-1_000_000_000, -1_500_000_000))
        out.append(os.stat(b / "u").st_mtime_ns)
        # UTIME_NOW moves ctime and mtime forward
        os.utime(b / "u", ns=(0, 0))
        before = os.stat(b / "u").st_ctime_ns
        os.utime(b / "u")
        st = os.stat(b / "u")
        out.append((st.st_mtime_ns > 0, st.st_ctime_ns >= before))
        # utime on an open, written file sticks after close
        fd = os.open(b / "w", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"data")
        os.utime(fd, ns=(7, 8))
        os.close(fd)
        out.append(os.stat(b / "w").st_mtime_ns)
        return out

    same(pair, fn)


def test_chmod_chown_and_permissions(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        (b / "root644").write_text("root's")
        os.chmod(b / "root644", 0o644)
        (b / "mine").write_text("mine")
        os.chown(b / "mine", 1000, 1000)
        os.chmod(b / "mine", 0o644)
        (b / "suid").write_text("s")
        os.chmod(b / "suid", 0o6755)
        os.chown(b / "suid", 1000, 1000)  # chown clears set-uid/set-gid
        owners = [(os.stat(b / n).st_uid, os.stat(b / n).st_gid) for n in ("mine", "root644")]
        modes = [oct(os.stat(b / n).st_mode) for n in ("mine", "suid")]

        def child() -> Any:
            return [
                errname(lambda: os.close(os.open(b / "root644", os.O_WRONLY))),
                errname(lambda: os.close(os.open(b / "root644", os.O_RDONLY))),
                errname(lambda: os.close(os.open(b / "mine", os.O_WRONLY))),
                errname(lambda: os.truncate(b / "root644", 0)),
                errname(lambda: os.chmod(b / "root644", 0o666)),
                errname(lambda: os.chown(b / "mine", 0, 0)),
                errname(lambda: os.utime(b / "root644")),
                errname(lambda: os.utime(b / "root644", (1, 1))),
                errname(lambda: os.utime(b / "mine", (1, 1))),
                errname(lambda: os.setxattr(b / "root644", "user.x", b"1")),
                errname(lambda: os.chmod(b / "mine", 0o600)),
                errname(lambda: (b / "by1000").write_text("x")),
                errname(lambda: [os.stat(b / "by1000").st_uid, os.stat(b / "by1000").st_gid]),
            ]

        res = run_as(1000, 1000, child)
        return owners, modes, res, (b / "root644").read_text()

    out = same(pair, fn)[1]
    assert out[0] == [(1000, 1000), (0, 0)] and out[1] == ["0o100644", "0o100755"]
    assert out[2][0] == ["err", "EACCES"] and out[2][2] == ["ok", None]
    assert out[2][-1] == ["ok", [1000, 1000]]


def test_non_owner_cannot_write_or_delete_in_sticky_dir(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> Any:
        os.mkdir(b / "st")
        os.chmod(b / "st", 0o1777)
        (b / "st" / "f").write_text("x")
        os.mkdir(b / "closed", 0o755)
        (b / "closed" / "g").write_text("x")

        def child() -> Any:
            return [errname(lambda: os.unlink(b / "st" / "f")),
                    errname(lambda: os.unlink(b / "closed" / "g")),
                    errname(lambda: (b / "closed" / "h").write_text("x")),
                    errname(lambda: os.listdir(b / "closed"))]

        return run_as(1000, 1000, child)

    same(pair, fn)


def test_umask_and_setgid_dirs(pair: tuple[Path, Path]) -> None:
    def fn(b: Path) -> tuple:
        old = os.umask(0o027)
        try:
            (b / "um").write_text("")
            os.mkdir(b / "umd", 0o777)
            os.mkdir(b / "sg")
            os.chown(b / "sg", 0, 1000)
            os.chmod(b / "sg", 0o2775)
            (b / "sg" / "f").write_text("")
            os.mkdir(b / "sg" / "d")
        finally:
            os.umask(old)
        return [(oct(os.stat(b / p).st_mode), os.stat(b / p).st_gid)
                for p in ("um", "umd", "sg/f", "sg/d")]

    same(pair, fn)


# ------------------------------------------------------------------- statfs


def test_statfs(shared: Shared) -> None:
    s = os.statvfs(shared.get().main)
    assert s.f_namemax == 255
    assert s.f_blocks > 0 and s.f_bsize > 0 and s.f_frsize > 0
    assert s.f_bavail <= s.f_bfree <= s.f_blocks
    res = subprocess.run(["df", "-P", str(shared.get().main)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------- CLI


def test_mount_over_missing_directory(tmp_path: Path) -> None:
    jz("init", str(tmp_path / "r"))
    res = jz("mount", str(tmp_path / "r"), str(tmp_path / "no" / "such"), check=False)
    assert res.returncode == 1
    assert "does not exist" in res.stderr and str(tmp_path / "no" / "such") in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    res = jz("mount", str(tmp_path / "r"), str(tmp_path / "file"), check=False)
    assert res.returncode == 1 and "not a directory" in res.stderr
    assert "Traceback" not in res.stderr


def test_daemon_logged_no_unexpected_errors(shared: Shared) -> None:
    """Runs last: nothing above made a handler fail unexpectedly (an EIO and a traceback)."""
    log = (shared.base / "repo" / "run" / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
