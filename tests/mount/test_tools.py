"""Ordinary tools in a branch directory, compared with the same tools on a local directory.

Each tool runs once on a local temp directory and once in a mounted branch;
the resulting trees are compared byte for byte and with their metadata
(mode, mtime where the tool preserves it, symlink targets, sizes, hard link
counts).  One mount serves the module; the tests that remount use ``mnt``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Mount, jz, start_mount, teardown

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("tools")
    jz("init", str(base / "repo"))
    m = start_mount(base / "repo", base / "mnt")
    try:
        yield m
    finally:
        teardown(m)


@pytest.fixture
def branch(shared: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the mounted main branch."""
    d = shared.main / request.node.name
    d.mkdir()
    return d


def run(*cmd: str | Path, cwd: Path | None = None, env: dict | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, LC_ALL="C")
    if env:
        e.update(env)
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=e, capture_output=True,
                         input=input, timeout=240)
    assert res.returncode == 0, (f"{cmd} failed ({res.returncode}):\n"
                                 f"{res.stdout.decode(errors='replace')}\n"
                                 f"{res.stderr.decode(errors='replace')}")
    return res


def tree(root: Path, mtime: bool = True, mode_mask: int = 0o7777,
         dir_mtime: bool = True, dir_nlink: bool = True) -> dict[str, tuple]:
    """Everything about a tree that the tools should reproduce, keyed by relative path."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*sorted(dirnames), *sorted(filenames)]:
            p = Path(dirpath) / name
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            row: list = [stat.filemode(st.st_mode & ~0o7777 | st.st_mode & mode_mask)]
            if stat.S_ISLNK(st.st_mode):
                row += ["->", os.readlink(p)]
            elif stat.S_ISREG(st.st_mode):
                row += [st.st_size, st.st_nlink, hashlib.sha256(p.read_bytes()).hexdigest()]
            elif stat.S_ISDIR(st.st_mode) and dir_nlink:
                row += [st.st_nlink]
            if mtime and kind != stat.S_IFLNK and (dir_mtime or kind != stat.S_IFDIR):
                row.append(st.st_mtime_ns)
            out[rel] = tuple(row)
    return out


def assert_same_tree(a: Path, b: Path, **kw: object) -> None:
    ta, tb = tree(a, **kw), tree(b, **kw)  # type: ignore[arg-type]
    diff = {k: (ta.get(k), tb.get(k)) for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k)}
    assert not diff, f"trees differ ({a} vs {b}):\n" + "\n".join(
        f"  {k}: {v[0]} != {v[1]}" for k, v in sorted(diff.items()))


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small local tree: files, subdirs, symlinks, an empty file, a 3 MiB file, a hard link."""
    s = tmp_path_factory.mktemp("src") / "src"
    (s / "sub" / "deep").mkdir(parents=True)
    (s / "emptydir").mkdir()
    (s / "a.txt").write_text("hello\n")
    (s / "empty").write_bytes(b"")
    (s / "big.bin").write_bytes(os.urandom(3 << 20))
    (s / "sub" / "deep" / "x.csv").write_text("x,y\n1,2\n" * 1000)
    (s / "sub" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(s / "sub" / "script.sh", 0o755)
    (s / "private").write_text("secret")
    os.chmod(s / "private", 0o600)
    os.chmod(s / "sub" / "deep", 0o750)
    os.symlink("a.txt", s / "link")
    os.symlink("sub/deep", s / "dirlink")
    os.symlink("/nonexistent/target", s / "dangling")
    os.link(s / "a.txt", s / "sub" / "hard")
    os.utime(s / "sub" / "deep" / "x.csv", ns=(1_500_000_000_123_456_789,) * 2)
    os.utime(s / "emptydir", ns=(1_400_000_000_000_000_001,) * 2)
    return s


# ------------------------------------------------------------------------ cp


def test_cp_a_into_mount_contents(src: Path, branch: Path, tmp_path: Path) -> None:
    run("cp", "-a", src, tmp_path / "local")
    run("cp", "-a", src, branch / "copy")
    # modes are checked separately below; everything else here
    assert_same_tree(tmp_path / "local", branch / "copy", mode_mask=0)
    assert_same_tree(src, branch / "copy", mode_mask=0)


def test_cp_a_into_mount_modes(src: Path, branch: Path) -> None:
    run("cp", "-a", src, branch / "copy")
    assert_same_tree(src, branch / "copy")


def test_cp_a_out_of_mount(src: Path, branch: Path, tmp_path: Path) -> None:
    # populate with tar (pax keeps ns mtimes; tar sets modes with chmod, not ACL xattrs)
    run("tar", "--format=posix", "-C", src.parent, "-cf", tmp_path / "src.tar", "src")
    run("tar", "-C", branch, "-xpf", tmp_path / "src.tar")
    assert_same_tree(src, branch / "src")
    run("cp", "-a", branch / "src", tmp_path / "back")
    assert_same_tree(src, tmp_path / "back")
    run("cp", "-a", src, tmp_path / "local")
    # a copy inside the mount (modes: see test_cp_a_into_mount_modes)
    run("cp", "-a", branch / "src", branch / "again")
    assert_same_tree(src, branch / "again", mode_mask=0)


def test_cp_over_existing_and_no_clobber(branch: Path, tmp_path: Path) -> None:
    for d in (branch, tmp_path):
        (d / "a").write_bytes(os.urandom(200_000))
        (d / "b").write_bytes(b"short")
        (d / "c").write_bytes(b"keep")
        run("cp", d / "a", d / "b")  # O_TRUNC over a shorter file
        run("cp", "-n", d / "b", d / "c")
        assert (d / "b").read_bytes() == (d / "a").read_bytes()
        assert (d / "c").read_bytes() == b"keep"


# --------------------------------------------------------------------- rsync


def test_rsync_in_and_out(src: Path, branch: Path, tmp_path: Path) -> None:
    run("rsync", "-a", f"{src}/", f"{branch}/r/")
    run("rsync", "-a", f"{src}/", f"{tmp_path}/local/")
    assert_same_tree(tmp_path / "local", branch / "r")
    # a second run finds nothing to do: sizes and mtimes were kept exactly
    res = run("rsync", "-ai", f"{src}/", f"{branch}/r/")
    assert res.stdout.decode().strip() == ""
    run("rsync", "-a", f"{branch}/r/", f"{tmp_path}/back/")
    assert_same_tree(tmp_path / "local", tmp_path / "back")
    # -H keeps hard links; --delete and a changed file
    run("rsync", "-aH", f"{src}/", f"{branch}/rh/")
    assert_same_tree(src, branch / "rh")
    assert os.stat(branch / "rh" / "a.txt").st_ino == os.stat(branch / "rh" / "sub" / "hard").st_ino
    (branch / "rh" / "extra").write_text("x")
    (branch / "rh" / "a.txt").write_text("changed\n")
    run("rsync", "-aH", "--delete", f"{src}/", f"{branch}/rh/")
    assert_same_tree(src, branch / "rh")
    # --inplace and --checksum paths
    run("rsync", "-a", "--inplace", "--checksum", f"{src}/", f"{branch}/ri/")
    assert_same_tree(tmp_path / "local", branch / "ri")


# ----------------------------------------------------------------------- tar


def test_tar_from_mount_is_byte_identical(src: Path, branch: Path, tmp_path: Path) -> None:
    run("tar", "-C", src.parent, "-cf", tmp_path / "src.tar", "src")
    run("tar", "-C", branch, "-xpf", tmp_path / "src.tar")
    (tmp_path / "x").mkdir()
    run("tar", "-C", tmp_path / "x", "-xpf", tmp_path / "src.tar")
    assert_same_tree(tmp_path / "x" / "src", branch / "src")
    assert_same_tree(src, branch / "src", mtime=False)  # gnu format: whole seconds
    common = ["tar", "--sort=name", "--format=gnu", "--numeric-owner"]
    run(*common, "-C", branch, "-cf", tmp_path / "mnt.tar", "src")
    run(*common, "-C", tmp_path / "x", "-cf", tmp_path / "local.tar", "src")
    assert (tmp_path / "mnt.tar").read_bytes() == (tmp_path / "local.tar").read_bytes()
    # pax: nanosecond mtimes survive a round trip through the mount
    run("tar", "--format=posix", "-C", src.parent, "-cf", tmp_path / "pax.tar", "src")
    (branch / "pax").mkdir()
    run("tar", "-C", branch / "pax", "-xpf", tmp_path / "pax.tar")
    assert_same_tree(src, branch / "pax" / "src")
    # compressed, through a pipe, written into the mount
    run("tar", "-C", tmp_path / "x", "-czf", branch / "src.tgz", "src")
    (branch / "untar").mkdir()
    run("tar", "-C", branch / "untar", "-xzpf", branch / "src.tgz")
    assert_same_tree(tmp_path / "x" / "src", branch / "untar" / "src")
    # tar -d finds no difference between the archive and the mount
    run("tar", "-C", branch, "-df", tmp_path / "src.tar")


def test_tools_carry_user_xattrs(branch: Path, tmp_path: Path) -> None:
    """tar --xattrs, rsync -X and cp --preserve=all keep user.* attributes."""
    src = tmp_path / "xs"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f")
    os.setxattr(src / "d" / "f", "user.tag", b"hello")
    os.setxattr(src / "d", "user.dirtag", b"\x00\xffbin")
    run("tar", "--xattrs", "--xattrs-include=user.*", "-C", tmp_path, "-cf",
        tmp_path / "xs.tar", "xs")
    (branch / "t").mkdir()
    run("tar", "--xattrs", "--xattrs-include=user.*", "-C", branch / "t", "-xf",
        tmp_path / "xs.tar")
    run("rsync", "-aX", f"{src}/", f"{branch}/r/")
    run("cp", "-a", "--preserve=all", src, branch / "c")
    for d in (branch / "t" / "xs", branch / "r", branch / "c"):
        assert os.getxattr(d / "d" / "f", "user.tag") == b"hello", d
        assert os.getxattr(d / "d", "user.dirtag") == b"\x00\xffbin", d
    # and back out of the mount
    run("rsync", "-aX", f"{branch}/r/", f"{tmp_path}/back/")
    assert os.getxattr(tmp_path / "back" / "d" / "f", "user.tag") == b"hello"


# ----------------------------------------------------------------------- git


def test_git_in_a_branch_and_commit_snapshot(shared: Mount, tmp_path: Path) -> None:
    os.mkdir(shared.mnt / "gitwork")  # a new branch
    work = shared.mnt / "gitwork" / "proj"
    work.mkdir()
    git = ["git", "-c", "user.name=Test", "-c", "user.email=t@example.com",
           "-c", "init.defaultBranch=master", "-c", "gc.auto=0"]
    run(*git, "init", "-q", cwd=work)
    for i in range(40):
        (work / f"f{i:02}.txt").write_text(f"line {i}\n" * (i + 1))
    (work / "bin").mkdir()
    (work / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(work / "bin" / "tool", 0o755)
    os.symlink("f01.txt", work / "alias")
    (work / "blob").write_bytes(os.urandom(300_000))
    run(*git, "add", "-A", cwd=work)
    run(*git, "commit", "-qm", "first", cwd=work)
    with open(work / "f01.txt", "a") as f:
        f.write("more\n")
    os.unlink(work / "f02.txt")
    run(*git, "mv", "f03.txt", "renamed.txt", cwd=work)
    run(*git, "commit", "-qam", "second", cwd=work)
    run(*git, "branch", "side", cwd=work)
    run(*git, "gc", "-q", "--aggressive", "--prune=now", cwd=work)
    run(*git, "fsck", "--full", "--strict", cwd=work)
    log = run(*git, "log", "--format=%s", cwd=work).stdout.decode().split()
    assert log == ["second", "first"]
    assert run(*git, "status", "--porcelain", cwd=work).stdout == b""
    # the same history cloned locally is the same history
    run(*git, "clone", "-q", work, tmp_path / "clone")
    assert run(*git, "rev-parse", "HEAD", cwd=tmp_path / "clone").stdout == \
        run(*git, "rev-parse", "HEAD", cwd=work).stdout

    # commit the branch with jiaozifuse from inside the worktree
    res = jz("commit", "-m", "git repo", "--json", cwd=work)
    cid = json.loads(res.stdout)["id"]
    snap = shared.mnt / ".commits" / cid / "proj"
    assert (snap / ".git" / "HEAD").read_text() == (work / ".git" / "HEAD").read_text()
    # a snapshot is read-only (no write bits) and reports nlink 2 for every directory
    assert_same_tree(work, snap, mode_mask=0o7555, dir_mtime=False, dir_nlink=False)
    env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
           "GIT_CONFIG_VALUE_0": "*"}
    run("git", "--git-dir", snap / ".git", "fsck", "--full", "--no-dangling", env=env)
    log2 = run("git", "--git-dir", snap / ".git", "log", "--format=%s", env=env)
    assert log2.stdout.decode().split() == ["second", "first"]


def test_hard_link_tools(branch: Path, tmp_path: Path) -> None:
    """git clone --local, cp -al and rsync --link-dest make hard links."""
    git = ["git", "-c", "user.name=T", "-c", "user.email=t@e", "-c", "init.defaultBranch=m"]
    for d in (tmp_path, branch):
        run(*git, "init", "-q", d / "a")
        for i in range(20):
            (d / "a" / f"f{i}").write_text(f"{i}\n" * i)
        run(*git, "add", ".", cwd=d / "a")
        run(*git, "commit", "-qm", "one", cwd=d / "a")
        run(*git, "clone", "-q", "--local", d / "a", d / "b")
        with open(d / "b" / "f1", "a") as f:
            f.write("more\n")
        run(*git, "commit", "-qam", "two", cwd=d / "b")
        run(*git, "fsck", "--strict", cwd=d / "b")
        run(*git, "-C", d / "a", "pull", "-q", "--ff-only", d / "b")
        run(*git, "gc", "-q", "--prune=now", cwd=d / "a")
        run(*git, "fsck", "--strict", cwd=d / "a")
        run("cp", "-al", d / "a", d / "c")
        run("rsync", "-a", f"--link-dest={d / 'a'}", f"{d / 'a'}/", f"{d / 'd'}/")
        assert os.stat(d / "c" / "f3").st_ino == os.stat(d / "a" / "f3").st_ino
    # git's own files hold paths and times; the work trees and link counts must match
    def work_files(d: Path) -> dict:
        return {k: v for k, v in tree(d, mtime=False).items() if ".git" not in k.split("/")}

    assert work_files(branch) == work_files(tmp_path)
    for d in (tmp_path, branch):
        assert run("git", "-C", d / "a", "rev-list", "--count", "HEAD").stdout == b"2\n"


def test_mv_between_branches(shared: Mount, tmp_path: Path) -> None:
    """rename(2) across branches is EXDEV; mv falls back to copy and delete."""
    other = shared.mnt / "mvtarget"
    other.mkdir()
    src = shared.main / "mvsrc"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(100_000))
    os.symlink("f", src / "d" / "l")
    os.utime(src / "d" / "f", ns=(1, 1_234_567_890_123_456_789))
    before = tree(src)
    with pytest.raises(OSError) as ei:
        os.rename(src / "d", other / "d")
    assert ei.value.errno == errno.EXDEV
    run("mv", src / "d", other / "d")
    assert not (src / "d").exists()
    assert tree(other / "d") == {k.removeprefix("d/"): v for k, v in before.items()
                                 if k.startswith("d/")}


# -------------------------------------------------------------------- sqlite


SQL_FILL = (
    "CREATE TABLE t(i INTEGER PRIMARY KEY, s TEXT, b BLOB);"
    "CREATE INDEX ts ON t(s);"
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<10000) "
    "INSERT INTO t SELECT x, printf('row-%06d', x), zeroblob(x % 300) FROM c;"
    "UPDATE t SET s = s || '-u' WHERE i % 7 = 0;"
    "DELETE FROM t WHERE i % 11 = 0;"
)


def test_sqlite_integrity_and_remount(mnt: Mount, tmp_path: Path) -> None:
    results = {}
    for name, d in (("local", tmp_path), ("mount", mnt.main)):
        db = d / "t.db"
        run("sqlite3", db, SQL_FILL)
        run("sqlite3", db, "PRAGMA journal_mode=WAL; INSERT INTO t(s) VALUES('wal');")
        out = run("sqlite3", db, "PRAGMA integrity_check; SELECT count(*), sum(length(b)), "
                  "max(s) FROM t;").stdout.decode()
        results[name] = out
    assert results["mount"] == results["local"]
    assert results["mount"].startswith("ok\n")
    # a checkpoint folds the WAL back; the file is then the same size as the local one
    for d in (tmp_path, mnt.main):
        run("sqlite3", d / "t.db", "PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode=DELETE;")
    assert os.path.getsize(mnt.main / "t.db") == os.path.getsize(tmp_path / "t.db")
    m2 = mnt.remount()
    out = run("sqlite3", m2.main / "t.db", "PRAGMA integrity_check; SELECT count(*), "
              "sum(length(b)), max(s) FROM t;").stdout.decode()
    assert out == results["local"]
    # a rollback journal transaction after the remount
    run("sqlite3", m2.main / "t.db", "BEGIN; DELETE FROM t WHERE i < 5000; ROLLBACK; "
        "BEGIN; UPDATE t SET s='z' WHERE i=1; COMMIT; VACUUM;")
    out = run("sqlite3", m2.main / "t.db", "PRAGMA integrity_check; SELECT count(*) FROM t;")
    count = results["local"].splitlines()[1].split("|")[0]
    assert out.stdout.decode().splitlines() == ["ok", count]

    # crash consistency: kill -9 the daemon under two writers; every transaction
    # sqlite reported committed is there after a remount, and the files are sound
    code = (
        "import sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1], timeout=5)\n"
        "con.execute('PRAGMA journal_mode=' + sys.argv[2])\n"
        # A SIGKILL of the daemon is a power loss for the filesystem: in DELETE
        # mode only synchronous=EXTRA makes sqlite fsync the directory after it
        # unlinks the journal (its commit point), as on any local filesystem.
        "con.execute('PRAGMA synchronous=EXTRA')\n"
        "con.execute('CREATE TABLE IF NOT EXISTS t(n INTEGER, pad BLOB)')\n"
        "n = 0\n"
        "while True:\n"
        "    with con:\n"
        "        con.execute('INSERT INTO t VALUES (?, zeroblob(3000))', (n,))\n"
        "    print(n, flush=True)\n"
        "    n += 1\n"
    )
    procs = {mode: subprocess.Popen([sys.executable, "-c", code, str(m2.main / f"{mode}.db"),
                                     mode], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
             for mode in ("delete", "wal")}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
            (m2.main / f"{mode}.db").exists() and os.path.getsize(m2.main / f"{mode}.db") > 20_000
            for mode in procs):
        time.sleep(0.2)
    os.kill(m2.pid, signal.SIGKILL)
    committed = {}
    for mode, pr in procs.items():
        out_, _ = pr.communicate(timeout=60)
        committed[mode] = len(out_.split())
    m3 = m2.remount()
    for mode, n in committed.items():
        res = run("sqlite3", m3.main / f"{mode}.db", "PRAGMA integrity_check; "
                  "SELECT count(*), count(DISTINCT n) FROM t;").stdout.decode().split()
        assert res[0] == "ok", (mode, res)
        count, distinct = map(int, res[1].split("|"))
        assert count == distinct >= n, f"{mode}: {count} rows after the crash, {n} committed"


# ------------------------------------------------------------- venv and pip


def _tiny_wheel(d: Path) -> Path:
    """Build a pure-Python wheel by hand (no setuptools, no network)."""
    files = {
        "tinypkg/__init__.py": b"X = 42\n",
        "tinypkg/data.txt": b"payload\n" * 100,
        "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\n"
                                          b"Version: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\n"
                                       b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        "tinypkg-0.1.dist-info/entry_points.txt": b"[console_scripts]\n"
                                                  b"tinycmd = tinypkg:main\n",
    }
    files["tinypkg/__init__.py"] += b"def main():\n    print('tiny', X)\n"
    record = []
    for name, data in files.items():
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={h},{len(data)}")
    record.append("tinypkg-0.1.dist-info/RECORD,,")
    files["tinypkg-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = d / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return whl


def test_venv_and_pip_install(branch: Path, tmp_path: Path) -> None:
    whl = _tiny_wheel(tmp_path)
    venv = branch / "venv"
    # a full venv: ensurepip installs pip from its bundled wheel (--no-index), ~1000 files
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q"]
    run(*pip, "install", "--no-index", "--no-cache-dir", whl)
    out = run(venv / "bin" / "python", "-c",
              "import tinypkg, importlib.resources as r; "
              "print(tinypkg.X, r.files('tinypkg').joinpath('data.txt').read_text()[:7])")
    assert out.stdout.decode().split() == ["42", "payload"]
    assert run(venv / "bin" / "tinycmd").stdout == b"tiny 42\n"
    run(*pip, "check")
    site = next((venv / "lib").glob("python3*/site-packages"))
    listed = run(*pip[:-1], "list", "--format=json").stdout
    assert "tinypkg" in {p["name"] for p in json.loads(listed)}
    # uninstall removes exactly what RECORD lists
    run(*pip, "uninstall", "-y", "tinypkg")
    assert not (site / "tinypkg").exists()
    assert not list(site.glob("tinypkg-*"))
    # and pip itself still imports from the mount
    run(*pip, "--version")


# ------------------------------------------------------------- editor saves


def _atomic_save(p: Path, data: bytes) -> None:
    """What Python's atomic writers, vim (backupcopy=no) and most editors do."""
    tmp = p.with_name(f".{p.name}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, stat.S_IMODE(os.stat(p).st_mode))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, p)
    dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _vim_style_save(p: Path, data: bytes) -> None:
    """vim with backupcopy=no: rename the original to a backup, write anew, drop the backup."""
    swp = p.with_name(f".{p.name}.swp")
    swp.write_bytes(b"swap" * 1000)
    backup = p.with_name(p.name + "~")
    mode = stat.S_IMODE(os.stat(p).st_mode)
    os.rename(p, backup)
    fd = os.open(p, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(backup)
    os.unlink(swp)


@pytest.mark.parametrize("how", ["atomic", "vim"])
def test_editor_save_keeps_old_version_for_open_fds(branch: Path, tmp_path: Path,
                                                    how: str) -> None:
    save = _atomic_save if how == "atomic" else _vim_style_save
    results = []
    for d in (tmp_path, branch):
        p = d / "doc.txt"
        old = b"old version\n" * 20_000
        p.write_bytes(old)
        os.chmod(p, 0o640)
        fd = os.open(p, os.O_RDONLY)
        try:
            save(p, b"new version\n")
            assert os.pread(fd, len(old) + 10, 0) == old
            assert os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
        st = os.stat(p)
        results.append((p.read_bytes(), oct(st.st_mode), st.st_nlink, sorted(os.listdir(d))))
    assert results[0] == results[1]


def test_python_atomic_writes(branch: Path, tmp_path: Path) -> None:
    import tempfile

    out = []
    for d in (tmp_path, branch):
        target = d / "config.json"
        target.write_text("{}")
        for i in range(20):
            with tempfile.NamedTemporaryFile("w", dir=d, delete=False) as f:
                json.dump({"i": i, "pad": "x" * i * 100}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(f.name, target)
        shutil.copy2(target, d / "copy.json")
        out.append((json.loads(target.read_text())["i"], sorted(os.listdir(d)),
                    (d / "copy.json").read_bytes() == target.read_bytes()))
    assert out[0] == out[1] == (19, ["config.json", "copy.json"], True)


def _sed_both(branch: Path, tmp_path: Path) -> str:
    text = "".join(f"line {i} alpha\n" for i in range(5000))
    for d in (tmp_path, branch):
        (d / "s.txt").write_text(text)
        os.chmod(d / "s.txt", 0o751)
        os.link(d / "s.txt", d / "s.link")
        run("sed", "-i", "s/alpha/beta/; 3d", d / "s.txt")
        run("sed", "-i.bak", "1s/^/head /", d / "s.txt")
    return text


def test_sed_in_place(branch: Path, tmp_path: Path) -> None:
    text = _sed_both(branch, tmp_path)
    assert_same_tree(tmp_path, branch, mtime=False, mode_mask=0)
    assert (branch / "s.txt").read_text().startswith("head line 0 beta\nline 1 beta\nline 3")
    assert (branch / "s.link").read_text() == text  # sed -i breaks the hard link
    assert os.stat(branch / "s.txt").st_nlink == 1


def test_sed_in_place_keeps_mode(branch: Path, tmp_path: Path) -> None:
    _sed_both(branch, tmp_path)
    assert_same_tree(tmp_path, branch, mtime=False)


def test_shell_redirections_and_coreutils(branch: Path, tmp_path: Path) -> None:
    script = (
        "set -e\n"
        "seq 1 20000 > nums\n"
        "echo tail >> nums\n"
        "sort -r nums > sorted\n"
        "mkdir -p a/b/c && touch -d '2001-02-03 04:05:06.789' a/b/c/stamp\n"
        "ln -s ../nums a/rel && ln nums hard\n"
        "install -m 0751 nums a/installed\n"
        "mv sorted a/b/\n"
        "truncate -s 100K grown && truncate -s 10 nums.copy 2>/dev/null || true\n"
        "cp --sparse=always grown grown.sparse\n"
        "dd if=/dev/zero of=dd.out bs=4096 count=10 seek=3 status=none\n"
        "dd if=nums of=dd.out bs=1 count=5 seek=1 conv=notrunc status=none\n"
        "split -b 30000 nums part.\n"
        "cat part.* | cmp - nums\n"
        "rm part.aa\n"
        "find . -name '*.sparse' -delete\n"
        "chmod -R go-rwx a\n"
        "touch -r a/b/c/stamp nums\n"
    )
    for d in (tmp_path, branch):
        run("sh", "-c", script, cwd=d)
    assert_same_tree(tmp_path, branch, mtime=False)
    for rel in ("a/b/c/stamp", "nums"):
        assert os.stat(branch / rel).st_mtime_ns == os.stat(tmp_path / rel).st_mtime_ns


def test_daemon_logged_no_unexpected_errors(shared: Mount) -> None:
    """Runs last: nothing above made a handler fail unexpectedly (an EIO and a traceback)."""
    log = (shared.repo / "run" / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
