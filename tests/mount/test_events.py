"""The event log seen through a real mount: what `cp`, `mv`, `rm`, an editor's save and
the repository commands record, in order, and its forwarding to Redis Streams.

Most tests share one mount (module scope) and look only at the events after the
sequence number they started from.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jiaozifuse import control

from .conftest import JZ, Mount, jz, start_mount, teardown

KEYS = ("type", "branch", "path", "old_path", "size")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("events")
    jz("init", str(base / "repo"))
    m = start_mount(base / "repo", base / "mnt")
    try:
        yield m
    finally:
        teardown(m)
    log = (base / "repo" / "run" / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def last_seq(m: Mount) -> int:
    return control.call(m.repo, "events", {"since": 0, "limit": 0})["last_seq"]


def events_since(m: Mount, since: int) -> list[dict]:
    """What `jiaozifuse events tail --since N --json` prints, parsed."""
    out = m.cli("events", "tail", "--since", str(since), "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def proj(evs: list[dict]) -> list[tuple]:
    return [tuple(e.get(k) for k in KEYS) for e in evs]


def sh(cwd: Path, *argv: str) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=30)


def test_file_tools_give_the_expected_events(shared: Mount) -> None:
    m = shared
    base = last_seq(m)
    root = m.main
    sh(root, "mkdir", "ops")
    (root / "ops" / "a.csv").write_bytes(b"x" * 100)
    sh(root, "cp", "ops/a.csv", "ops/b.csv")
    sh(root, "mv", "ops/b.csv", "ops/c.csv")
    sh(root, "chmod", "600", "ops/c.csv")
    sh(root, "touch", "ops/c.csv")
    sh(root, "touch", "ops/new")
    sh(root, "rm", "ops/c.csv")
    sh(root, "mkdir", "ops/sub")
    sh(root, "rmdir", "ops/sub")
    (root / "ops" / "t").mkdir()
    (root / "ops" / "t" / "f").write_bytes(b"12345")
    sh(root, "rm", "-r", "ops/t")
    # an editor's save: write a temporary file, rename it over the original
    (root / "ops" / "doc.txt").write_bytes(b"v1")
    tmp = root / "ops" / ".doc.txt.swp"
    with open(tmp, "wb") as f:
        f.write(b"version 2")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "ops" / "doc.txt")
    sh(root, "mv", "ops", "ops2")

    M = "main"
    assert proj(events_since(m, base)) == [
        ("mkdir", M, "ops", None, None),
        ("create", M, "ops/a.csv", None, 0),
        ("close_write", M, "ops/a.csv", None, 100),
        ("create", M, "ops/b.csv", None, 0),
        ("close_write", M, "ops/b.csv", None, 100),
        ("move", M, "ops/c.csv", "ops/b.csv", None),
        ("attrib", M, "ops/c.csv", None, None),
        ("attrib", M, "ops/c.csv", None, None),
        ("create", M, "ops/new", None, 0),
        ("attrib", M, "ops/new", None, None),
        ("close_write", M, "ops/new", None, 0),
        ("delete", M, "ops/c.csv", None, None),
        ("mkdir", M, "ops/sub", None, None),
        ("rmdir", M, "ops/sub", None, None),
        ("mkdir", M, "ops/t", None, None),
        ("create", M, "ops/t/f", None, 0),
        ("close_write", M, "ops/t/f", None, 5),
        ("delete", M, "ops/t/f", None, None),
        ("rmdir", M, "ops/t", None, None),
        ("create", M, "ops/doc.txt", None, 0),
        ("close_write", M, "ops/doc.txt", None, 2),
        ("create", M, "ops/.doc.txt.swp", None, 0),
        ("close_write", M, "ops/.doc.txt.swp", None, 9),
        ("move", M, "ops/doc.txt", "ops/.doc.txt.swp", None),
        ("move", M, "ops2", "ops", None),
    ]
    seq = last_seq(m)
    cid = json.loads(m.cli("commit", "-m", "ops", "--json").stdout)["id"]
    (ev,) = events_since(m, seq)
    assert (ev["type"], ev["branch"], ev["commit"]) == ("commit", "main", cid)
    assert ev["paths"] == ["ops2/a.csv", "ops2/doc.txt", "ops2/new"]
    seqs = [e["seq"] for e in events_since(m, base)]
    assert seqs == list(range(base + 1, base + 1 + len(seqs)))


def test_writes_fds_and_branch_dirs(shared: Mount) -> None:
    m = shared
    base = last_seq(m)
    fd = os.open(m.main / "big.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    for _ in range(10_000):
        os.write(fd, b"0123456789")
    os.close(fd)
    # two fds that write, one writable fd that does not, one read-only fd
    p = m.main / "two.bin"
    a = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    b = os.open(p, os.O_WRONLY)
    c = os.open(p, os.O_RDWR)
    d = os.open(p, os.O_RDONLY)
    os.pwrite(a, b"aaaa", 0)
    os.pwrite(b, b"bb", 4)
    for x in (a, b, c, d):
        os.close(x)
    os.truncate(p, 3)  # a truncate without an open fd is a write too
    with open(m.main / "big.bin", "rb") as f:  # reading records nothing
        assert len(f.read()) == 100_000
    # a branch directory made with mkdir at the top: its events carry its name
    os.mkdir(m.mnt / "side")
    (m.mnt / "side" / "s.txt").write_text("side")
    (m.main / "m.txt").write_text("main")
    os.rename(m.mnt / "side" / "s.txt", m.mnt / "side" / "s2.txt")

    evs = events_since(m, base)
    head = json.loads(m.cli("log", "-n", "1", "--json").stdout)[0]["id"]
    branch_ev = next(e for e in evs if e["type"] == "branch_create")
    assert (branch_ev["branch"], branch_ev["commit"]) == ("side", head)
    assert proj(e for e in evs if e["type"] != "branch_create") == [
        ("create", "main", "big.bin", None, 0),
        ("close_write", "main", "big.bin", None, 100_000),
        ("create", "main", "two.bin", None, 0),
        ("close_write", "main", "two.bin", None, 6),
        ("close_write", "main", "two.bin", None, 6),
        ("close_write", "main", "two.bin", None, 3),
        ("create", "side", "s.txt", None, 0),
        ("close_write", "side", "s.txt", None, 4),
        ("create", "main", "m.txt", None, 0),
        ("close_write", "main", "m.txt", None, 4),
        ("move", "side", "s2.txt", "s.txt", None),
    ]
    assert [e["type"] for e in evs].index("branch_create") < [
        e.get("path") for e in evs].index("s.txt")


def test_repository_operations(shared: Mount) -> None:
    m = shared

    def run(*args: str) -> dict:
        return json.loads(m.cli(*args, "--json").stdout)

    m.cli("commit", "-m", "what earlier tests left", check=False)
    (m.main / "repo-ops").mkdir()
    (m.main / "repo-ops" / "a.csv").write_text("a\n")
    base = last_seq(m)
    c1 = run("commit", "-m", "c1")["id"]
    run("branch", "create", "feat")
    (m.mnt / "feat" / "repo-ops" / "b.csv").write_text("b\n")
    c2 = run("commit", "-b", "feat", "-m", "c2")["id"]
    ff = run("merge", "feat", "--into", "main")
    assert ff["id"] == c2
    (m.main / "repo-ops" / "c.csv").write_text("c\n")
    c3 = run("commit", "-m", "c3")["id"]
    (m.mnt / "feat" / "repo-ops" / "d.csv").write_text("d\n")
    c4 = run("commit", "-b", "feat", "-m", "c4")["id"]
    mc = run("merge", "feat", "--into", "main")["id"]
    run("tag", "create", "v1")
    m.cli("tag", "delete", "v1")
    rv = run("revert", c3)["id"]
    (m.main / "repo-ops" / "junk").write_text("junk")
    run("reset", "--hard")
    run("reset", c1)
    m.cli("branch", "delete", "feat")

    all_evs = events_since(m, base)
    writes = {e["path"]: e["branch"] for e in all_evs if e["type"] == "close_write"}
    assert writes == {"repo-ops/b.csv": "feat", "repo-ops/c.csv": "main",
                      "repo-ops/d.csv": "feat", "repo-ops/junk": "main"}
    evs = [e for e in all_evs if e["type"] not in ("create", "close_write")]
    got = [(e["type"], e.get("branch"), e.get("commit")) for e in evs]
    assert got == [
        ("commit", "main", c1),
        ("branch_create", "feat", c1),
        ("commit", "feat", c2),
        ("merge", "main", c2),
        ("commit", "main", c3),
        ("commit", "feat", c4),
        ("merge", "main", mc),
        ("tag_create", None, mc),
        ("tag_delete", None, mc),
        ("revert", "main", rv),
        ("reset", "main", rv),
        ("reset", "main", c1),
        ("branch_delete", "feat", c4),
    ]
    by = {(e["type"], e.get("commit")): e for e in evs}
    assert by[("commit", c1)]["paths"] == ["repo-ops/a.csv"]
    assert by[("commit", c2)]["paths"] == ["repo-ops/b.csv"]
    assert by[("commit", c3)]["paths"] == ["repo-ops/c.csv"]
    assert by[("merge", c2)]["fast_forward"] is True and by[("merge", c2)]["source"] == "feat"
    assert by[("merge", mc)]["fast_forward"] is False
    assert by[("tag_create", mc)]["tag"] == "v1"
    assert by[("revert", rv)]["reverted"] == c3
    resets = [e for e in evs if e["type"] == "reset"]
    assert [(e["previous"], e["hard"]) for e in resets] == [(rv, True), (rv, False)]


def test_events_tail_follow(shared: Mount) -> None:
    m = shared
    since = last_seq(m)
    proc = subprocess.Popen([*JZ, "--repo", str(m.repo), "events", "tail", "-f", "--json",
                             "--since", str(since)], stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)
        (m.main / "followed.txt").write_text("x")
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + 20
        while buf.count(b"\n") < 2 and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                buf += data
        lines = [json.loads(line) for line in buf.splitlines()]
        assert proj(lines) == [("create", "main", "followed.txt", None, 0),
                               ("close_write", "main", "followed.txt", None, 1)]
        assert proc.poll() is None  # still following
    finally:
        proc.kill()
        proc.wait()


def _txnid(repo: Path) -> int:
    import lmdb

    env = lmdb.open(str(repo / "store"), readonly=True, max_dbs=32)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


def _mount_with_events(tmp_path: Path, name: str, events: dict) -> Mount:
    repo = tmp_path / f"{name}-repo"
    jz("init", str(repo))
    cfg = json.loads((repo / "config.json").read_text())
    cfg["events"] = events
    (repo / "config.json").write_text(json.dumps(cfg))
    return start_mount(repo, tmp_path / f"{name}-mnt")


def test_recording_events_adds_no_durable_commit_per_event(tmp_path: Path) -> None:
    """Events ride on the close's group commit: the trigger runner acknowledging events
    no rule matched must not add an fdatasync per event (it once tripled them)."""
    deltas = {}
    for name, events in (("on", {}), ("off", {"enabled": False})):
        m = _mount_with_events(tmp_path, name, events)
        try:
            (m.main / "d").mkdir()
            time.sleep(0.5)
            t0 = _txnid(m.repo)
            for i in range(200):
                (m.main / "d" / f"f{i}").write_bytes(b"x" * 16384)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until the runner caught up
                st = control.call(m.repo, "triggers_status", {"limit": 1})
                if st["offset"] >= st["last_seq"]:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            deltas[name] = _txnid(m.repo) - t0
        finally:
            teardown(m)
    assert deltas["off"] >= 200  # one durable commit per close
    assert deltas["on"] <= 1.25 * deltas["off"] + 20, deltas


# ---------------------------------------------------------------------- Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    srv = RedisServer(_free_port(), tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _stream(client, name: str) -> list[tuple[int, str, dict]]:
    out = []
    for _, fields in client.xrange(name):
        ev = json.loads(fields[b"event"].decode("utf-8", "surrogateescape"))
        assert int(fields[b"seq"]) == ev["seq"] and fields[b"type"].decode() == ev["type"]
        out.append((ev["seq"], ev["type"], ev))
    return out


def test_redis_forwarding_at_least_once(tmp_path: Path, redis_server: RedisServer) -> None:
    import redis

    m = _mount_with_events(tmp_path, "redis", {
        "redis_url": f"redis://127.0.0.1:{redis_server.port}/0", "redis_stream": "jz:test"})
    repo = m.repo
    client = redis.Redis(port=redis_server.port)
    try:
        for i in range(5):
            (m.main / f"f{i}.csv").write_text(f"{i}\n")
        m.cli("commit", "-m", "first")
        want = [(e["seq"], e["type"]) for e in events_since(m, 0)]
        assert len(want) == 11
        deadline = time.monotonic() + 20
        while len(_stream(client, "jz:test")) < len(want) and time.monotonic() < deadline:
            time.sleep(0.1)
        got = _stream(client, "jz:test")
        assert [(s, t) for s, t, _ in got] == want  # in order, once each
        assert got[-1][2]["paths"] == [f"f{i}.csv" for i in range(5)]

        stopped_at = last_seq(m)
        redis_server.stop()
        for i in range(5):
            (m.main / f"g{i}.csv").write_text(f"{i}\n")
        m.cli("commit", "-m", "while redis is down")
        time.sleep(1.5)
        missed = [(e["seq"], e["type"]) for e in events_since(m, stopped_at)]
        assert len(missed) == 11
        redis_server.start()  # an empty server: nothing persisted
        client = redis.Redis(port=redis_server.port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = {(s, t) for s, t, _ in _stream(client, "jz:test")}
            if seen >= set(missed):
                break
            time.sleep(0.2)
        got = _stream(client, "jz:test")
        dedup: dict[int, str] = {}
        for s, t, _ in got:
            dedup.setdefault(s, t)
        assert sorted(dedup.items()) == missed  # none missing (duplicates allowed)
        seqs = [s for s, _, _ in got]
        assert seqs == sorted(seqs)  # in order
        deadline = time.monotonic() + 10
        while control.call(repo, "events", {"since": 0, "limit": 0})["last_seq"] != \
                _consumer_offset(repo) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _consumer_offset(repo) == missed[-1][0]
    finally:
        teardown(m)


def _consumer_offset(repo: Path) -> int:
    with contextlib.suppress(Exception):
        from jiaozifuse.repo import Repository

        with Repository.open(repo, readonly=True) as r:
            return r.events.offset("redis")
    return -1
