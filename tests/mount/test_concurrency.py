"""Several processes on one branch at once, while commits are taken.

Writers are separate processes (the kernel sends their requests to the one
daemon concurrently); the test process commits in a loop meanwhile.  Every
file a writer produces carries a header naming its version, so any snapshot
can be checked on its own: each file in it must be exactly one of the
versions written (never torn), appended logs must end on a whole line, and a
later commit never shows an older version than an earlier one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Mount, jz, start_mount, teardown

WRITERS = 4
DURATION = 5.0  # seconds the writers run at least (and until 4 commits are in)

#: A writer process.  argv: branch dir, writer id, stop file (it stops once that exists).
#: * w<i>.bin is replaced atomically (temp file + rename) by ever newer versions;
#: * log<i>.txt grows by whole lines, one write() per line (O_APPEND);
#: * shared.log gets the same lines from every writer (O_APPEND);
#: * p<i>.bin is rewritten in place, one 4 KiB block per pwrite.
WRITER = r'''
import os, random, sys, time
d, i, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def version(i, v):
    n = random.Random(i * 100003 + v).choice((0, 1, 1000, 65536, 200000, 400000))
    head = b"w%d v%d n%d\n" % (i, v, n)
    return head + random.Random(i * 7919 + v).randbytes(n)

log = os.open(os.path.join(d, "log%d.txt" % i), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
shared = os.open(os.path.join(d, "shared.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
p = os.open(os.path.join(d, "p%d.bin" % i), os.O_RDWR | os.O_CREAT, 0o644)
v = 0
while True:
    tmp = os.path.join(d, ".w%d.tmp" % i)
    with open(tmp, "wb") as f:
        f.write(version(i, v))
    os.rename(tmp, os.path.join(d, "w%d.bin" % i))
    line = b"w%d line %d %s\n" % (i, v, b"x" * (v % 300))
    os.write(log, line)
    os.write(shared, line)
    for blk in range(16):
        os.pwrite(p, (b"%d:%d:%d;" % (i, v, blk)).ljust(4096, b"."), blk * 4096)
    if os.path.exists(stop):
        break
    v += 1
os.close(log); os.close(shared); os.close(p)
print(v)
'''


def version(i: int, v: int) -> bytes:
    n = random.Random(i * 100003 + v).choice((0, 1, 1000, 65536, 200000, 400000))
    head = b"w%d v%d n%d\n" % (i, v, n)
    return head + random.Random(i * 7919 + v).randbytes(n)


def log_line(i: int, v: int) -> bytes:
    return b"w%d line %d %s\n" % (i, v, b"x" * (v % 300))


def check_tree(root: Path, final: dict[int, int] | None = None) -> dict[str, int]:
    """Check a branch or snapshot tree; return the version seen for each file."""
    seen: dict[str, int] = {}
    for i in range(WRITERS):
        w = root / f"w{i}.bin"
        if w.exists():
            data = w.read_bytes()
            head = data.split(b"\n", 1)[0].split()
            v = int(head[1][1:])
            assert data == version(i, v), f"{w}: torn or wrong content for version {v}"
            seen[w.name] = v
        tmp = root / f".w{i}.tmp"
        if tmp.exists():  # caught mid-write: must be a prefix of one version
            data = tmp.read_bytes()
            if b"\n" in data:
                v = int(data.split(b"\n", 1)[0].split()[1][1:])
                assert version(i, v).startswith(data), f"{tmp}: not a prefix of version {v}"
        lg = root / f"log{i}.txt"
        if lg.exists():
            data = lg.read_bytes()
            assert data == b"" or data.endswith(b"\n"), f"{lg}: ends in a partial line"
            lines = data.splitlines(keepends=True)
            assert lines == [log_line(i, v) for v in range(len(lines))], f"{lg}: bad lines"
            seen[lg.name] = len(lines)
        pb = root / f"p{i}.bin"
        if pb.exists():
            data = pb.read_bytes()
            assert len(data) % 4096 == 0, f"{pb}: size {len(data)} is not whole blocks"
            for blk in range(len(data) // 4096):
                block = data[blk * 4096:(blk + 1) * 4096]
                wi, v, b = block.split(b";", 1)[0].split(b":")
                assert (int(wi), int(b)) == (i, blk), f"{pb}: block {blk} is {block[:20]!r}"
                assert block == (b"%d:%d:%d;" % (i, int(v), blk)).ljust(4096, b".")
    sh = root / "shared.log"
    if sh.exists():
        data = sh.read_bytes()
        assert data == b"" or data.endswith(b"\n"), "shared.log ends in a partial line"
        per: dict[int, list[int]] = {}
        for line in data.splitlines(keepends=True):
            parts = line.split(b" ", 3)
            i, v = int(parts[0][1:]), int(parts[2])
            assert line == log_line(i, v), f"shared.log: bad line {line[:40]!r}"
            per.setdefault(i, []).append(v)
        for i, vs in per.items():
            assert vs == list(range(len(vs))), f"shared.log: writer {i} lines out of order"
            seen[f"shared{i}"] = len(vs)
    if final is not None:
        for i, last in final.items():
            assert seen[f"w{i}.bin"] == last
            assert seen[f"log{i}.txt"] == last + 1
            assert seen[f"shared{i}"] == last + 1
            assert not (root / f".w{i}.tmp").exists()
    return seen


#: Reads every file of a snapshot over and over until the stop file appears;
#: keeps one fd open all along.  Prints a JSON report.
READER = r'''
import hashlib, json, os, sys, time
snap, stop = sys.argv[1], sys.argv[2]
def digests():
    out = {}
    for name in sorted(os.listdir(snap)):
        with open(os.path.join(snap, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out
first = digests()
names = sorted(first)
fd = os.open(os.path.join(snap, names[0]), os.O_RDONLY) if names else None
rounds, bad = 0, []
while not os.path.exists(stop):
    now = digests()
    if now != first:
        bad.append({k: (first.get(k), now.get(k)) for k in first.keys() | now.keys()
                    if first.get(k) != now.get(k)})
    if fd is not None:
        data = b""
        while True:
            chunk = os.pread(fd, 1 << 20, len(data))
            if not chunk:
                break
            data += chunk
        if hashlib.sha256(data).hexdigest() != first[names[0]]:
            bad.append({"open fd": names[0]})
    rounds += 1
    time.sleep(0.02)
print(json.dumps({"rounds": rounds, "bad": bad[:5], "files": len(first)}))
'''


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("conc")
    jz("init", str(base / "repo"))
    m = start_mount(base / "repo", base / "mnt")
    try:
        yield m
    finally:
        teardown(m)


def test_writers_committer_and_snapshot_readers(shared: Mount, tmp_path: Path) -> None:
    branch = shared.main / "work"
    branch.mkdir()
    # a first commit with a little data, read by a reader while everything changes
    (branch / "seed.bin").write_bytes(os.urandom(500_000))
    (branch / "w0.bin").write_bytes(version(0, 0))
    first = json.loads(shared.cli("commit", "-m", "seed", "--json").stdout)["id"]
    snap0 = shared.mnt / ".commits" / first / "work"
    before = {p.name: p.read_bytes() for p in snap0.iterdir()}
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(snap0), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wstop = tmp_path / "writers-stop"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(branch), str(i), str(wstop)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(WRITERS)]
    commits: list[str] = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < DURATION or len(commits) < 4:
            assert all(w.poll() is None for w in writers), "a writer died"
            res = shared.cli("commit", "--allow-empty", "-m", f"c{len(commits)}", "--json")
            commits.append(json.loads(res.stdout)["id"])
        wstop.write_text("")
        final = {}
        for i, w in enumerate(writers):
            out, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
            final[i] = int(out)
    finally:
        stop.write_text("")
        wstop.write_text("")
        for w in writers:
            if w.poll() is None:
                w.kill()
        rout, rerr = reader.communicate(timeout=60)
    assert reader.returncode == 0, rerr
    report = json.loads(rout)
    assert report["bad"] == [], report
    assert report["rounds"] > 3 and report["files"] == 2
    assert all(v > 3 for v in final.values()), final
    # the branch itself: every file complete, at its last version
    check_tree(branch, final)
    # every snapshot taken meanwhile is consistent, and versions never go back
    last: dict[str, int] = {}
    for cid in commits:
        seen = check_tree(shared.mnt / ".commits" / cid / "work")
        for k, v in seen.items():
            assert v >= last.get(k, -1), f"commit {cid[:12]}: {k} went back to {v}"
            last[k] = v
    # one more commit after the writers: it holds exactly the final state
    cid = json.loads(shared.cli("commit", "--allow-empty", "-m", "end", "--json").stdout)["id"]
    check_tree(shared.mnt / ".commits" / cid / "work", final)
    # and the first snapshot still has its bytes
    assert {p.name: p.read_bytes() for p in snap0.iterdir()} == before


def test_snapshot_unchanged_while_branch_file_is_rewritten_in_place(shared: Mount) -> None:
    branch = shared.main / "inplace"
    branch.mkdir()
    data = os.urandom(3 << 20)
    (branch / "big").write_bytes(data)
    (branch / "copy").write_bytes(data)  # same chunks: deduplicated
    cid = json.loads(shared.cli("commit", "-m", "big", "--json").stdout)["id"]
    snap = shared.mnt / ".commits" / cid / "inplace"
    sfd = os.open(snap / "big", os.O_RDONLY)
    try:
        assert os.pread(sfd, 100, 0) == data[:100]
        # rewrite the branch file in place: scattered writes, a truncate, growth
        fd = os.open(branch / "big", os.O_RDWR)
        try:
            rng = random.Random(5)
            for _ in range(50):
                off = rng.randrange(0, 3 << 20)
                os.pwrite(fd, os.urandom(rng.randrange(1, 100_000)), off)
                assert os.pread(sfd, 4096, off) == data[off:off + 4096]
            os.ftruncate(fd, 1 << 20)
            os.pwrite(fd, b"tail", 5 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        shared.cli("commit", "-m", "rewritten")
        got = b""
        while chunk := os.pread(sfd, 1 << 20, len(got)):
            got += chunk
        assert got == data
    finally:
        os.close(sfd)
    assert (snap / "big").read_bytes() == data
    assert (snap / "copy").read_bytes() == data
    assert (branch / "copy").read_bytes() == data
    assert os.path.getsize(branch / "big") == (5 << 20) + 4


def test_two_processes_write_disjoint_regions_of_one_file(shared: Mount, tmp_path: Path) -> None:
    code = r'''
import os, sys
path, k = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY)
for blk in range(k, 256, 2):
    os.pwrite(fd, bytes([blk]) * 8192, blk * 8192)
os.close(fd)
'''
    results = []
    for d in (tmp_path, shared.main):
        p = d / "regions"
        p.write_bytes(b"")
        procs = [subprocess.Popen([sys.executable, "-c", code, str(p), str(k)]) for k in (0, 1)]
        for pr in procs:
            assert pr.wait(timeout=60) == 0
        results.append(hashlib.sha256(p.read_bytes()).hexdigest())
    assert results[0] == results[1]
    assert (shared.main / "regions").read_bytes() == b"".join(
        bytes([b]) * 8192 for b in range(256))


def test_many_appenders_lose_nothing(shared: Mount) -> None:
    code = r'''
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for n in range(300):
    os.write(fd, b"%s %04d\n" % (sys.argv[2].encode(), n))
os.close(fd)
'''
    p = shared.main / "appended.log"
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), f"p{k}"]) for k in range(6)]
    for pr in procs:
        assert pr.wait(timeout=120) == 0
    lines = p.read_bytes().splitlines()
    assert len(lines) == 6 * 300, f"{6 * 300 - len(lines)} appends lost"
    for k in range(6):
        mine = [ln for ln in lines if ln.startswith(b"p%d " % k)]
        assert mine == [b"p%d %04d" % (k, n) for n in range(300)]
    assert time.monotonic() - t0 < 60


def test_sqlite_concurrent_writers(shared: Mount) -> None:
    """Two sqlite3 processes writing one database: POSIX locks keep it consistent."""
    db = shared.main / "conc.db"
    subprocess.run(["sqlite3", str(db), "CREATE TABLE t(w INTEGER, n INTEGER);"], check=True)
    code = r'''
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=60)
for n in range(100):
    with con:
        con.execute("INSERT INTO t VALUES (?, ?)", (int(sys.argv[2]), n))
con.close()
'''
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db), str(k)],
                              stderr=subprocess.PIPE, text=True) for k in range(3)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err
    out = subprocess.run(["sqlite3", str(db), "PRAGMA integrity_check; "
                          "SELECT w, count(*), max(n) FROM t GROUP BY w;"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ok", "0|100|99", "1|100|99", "2|100|99"]


def test_daemon_logged_no_unexpected_errors(shared: Mount) -> None:
    """Runs last: nothing above made a handler fail unexpectedly (an EIO and a traceback)."""
    log = (shared.repo / "run" / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]


def test_an_append_reaches_the_daemon_as_one_write(mount_factory) -> None:
    """A write() that crosses a page boundary is one FUSE write, so no commit or
    reader can fall between its halves: through the page cache the kernel cuts it
    where it leaves a page it does not hold whole (a growing file's tail page),
    which put half-lines into snapshots of appended logs."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = mount_factory("r", "--metrics-addr", f"127.0.0.1:{port}")

    def writes() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            if line.startswith('jiaozifuse_fuse_requests_total{op="write"}'):
                return float(line.rpartition(" ")[2])
        return 0.0

    path = m.main / "app.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"a" * 4000 + b"\n")
        for k in range(1, 6):  # lines across the 4 KiB boundaries after it
            before = writes()
            os.write(fd, b"%d" % k * 2000 + b"\n")
            assert writes() - before == 1, f"line {k} reached the daemon in pieces"
    finally:
        os.close(fd)
    want = b"a" * 4000 + b"\n" + b"".join(b"%d" % k * 2000 + b"\n" for k in range(1, 6))
    assert path.read_bytes() == want


def test_a_reader_sees_what_an_appender_adds(mnt: Mount) -> None:
    """Appends bypass the page cache; a reader holding the file's cached tail
    page, by its own descriptor or a new one, still reads every appended byte."""
    path = mnt.main / "grow.log"
    path.write_bytes(b"0" * 3000)
    r = os.open(path, os.O_RDONLY)
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert os.pread(r, 1 << 16, 0) == b"0" * 3000  # the tail page is now cached
        want = b"0" * 3000
        for k in range(1, 6):
            line = b"%d" % k * 1500 + b"\n"
            os.write(a, line)
            want += line
            assert os.pread(r, 1 << 16, 0) == want, f"stale after append {k}"
            assert path.read_bytes() == want
    finally:
        os.close(a)
        os.close(r)
